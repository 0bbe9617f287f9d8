"""peft.embedding_on_host: the frozen token embedding in pinned host memory trains and saves like the GPU one."""
import gc

import pytest
import torch

from optrush.config import ConfigError, load_config
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.train.optimizations import apply_optimizations

VOCAB = 128
BASE = ["model.preset=debug", "precision.mode=fp32", "data.max_length=32", "peft.method=lora", "peft.r=4"]


def lora_model(device: str, *extra: str, tie: bool = False):
    torch.manual_seed(0)  # the LoRA A matrices draw from the global generator
    cfg = load_config(None, [*BASE, f"train.device={device}", *extra], synthetic_data=True)
    model = build_model(get_preset("debug", vocab_size=VOCAB, tie_embeddings=tie), seed=0, device=device)
    return apply_optimizations(model, cfg)


def train_steps(model, device: str, steps: int = 3) -> tuple[list[float], dict]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=none"], "peft.embedding_on_host=true keeps a frozen embedding table in host memory: set "
                           "peft.method=lora or dora (got none)"),
    (["parallel.strategy=ddp"], "peft.embedding_on_host=true works on one GPU"),
])
def test_config_rejects_what_cannot_keep_the_table_on_the_host(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, [*BASE, "peft.embedding_on_host=true", *overrides], synthetic_data=True)


def test_a_tied_head_is_refused_with_the_key_to_change():
    with pytest.raises(ValueError, match="ties its output head to the embedding.*peft.embedding_on_host=false"):
        lora_model("cpu", "peft.embedding_on_host=true", tie=True)


def assert_same_weights(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_on_cpu_the_table_is_host_memory_already_and_training_is_unchanged():
    losses, weights = train_steps(lora_model("cpu"), "cpu")
    got_losses, got_weights = train_steps(lora_model("cpu", "peft.embedding_on_host=true"), "cpu")
    assert got_losses == losses
    assert_same_weights(got_weights, weights)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["none", "model"])
def test_host_table_trains_saves_and_loads_like_the_gpu_table(compile_mode):
    """Same losses and weights as the table in GPU memory (eager and compiled gather), the table's bytes gone from
    the GPU allocator, and the parameter still saves and loads in place (checkpoints, resume)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    compiled = f"compile.mode={compile_mode}"
    runs = {}
    for on_host in (False, True):
        torch._dynamo.reset()
        gc.collect()  # the first model sits in reference cycles: freed now, not in the middle of the next measurement
        before = torch.cuda.memory_allocated()
        model = lora_model("cuda", compiled, f"peft.embedding_on_host={str(on_host).lower()}")
        runs[on_host] = (torch.cuda.memory_allocated() - before, *train_steps(model, "cuda"))
        if not on_host:
            del model  # before the next model is measured
    table = model.tok_embeddings.weight
    assert table.device.type == "cuda" and not table.requires_grad
    assert runs[False][0] - runs[True][0] == table.numel() * table.element_size()
    assert runs[True][1] == runs[False][1]
    assert_same_weights(runs[True][2], runs[False][2])

    replacement = torch.randn_like(table)
    model.load_state_dict({**model.state_dict(), "tok_embeddings.weight": replacement})
    assert model.tok_embeddings.weight.data_ptr() == table.data_ptr()  # loaded into the host memory, in place
    assert torch.equal(model.state_dict()["tok_embeddings.weight"].cpu(), replacement.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_training_run_with_the_host_table_equals_one_without(debug_overrides, tmp_path, device):
    """`optrush train` as a user runs it (recipe data, LoRA, a checkpoint mid-run, the merged model and adapter
    saved at the end): the same losses and the same saved model with the table in host memory."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from safetensors.torch import load_file

    from optrush.train import train

    base = [o for o in debug_overrides if not o.startswith(("output_dir", "train.device"))]
    base += [f"train.device={device}", "peft.method=lora", "peft.r=4", "train.max_steps=4", "checkpoint.every=2",
             "train.deterministic=true"]
    runs = {}
    for on_host in (False, True):
        out = tmp_path / str(on_host)
        summary = train(load_config(None, base + [f"output_dir={out}",
                                                  f"peft.embedding_on_host={str(on_host).lower()}"]))
        runs[on_host] = summary["losses"], load_file(out / "final" / "model.safetensors")
    assert runs[True][0] == runs[False][0]
    assert_same_weights(runs[True][1], runs[False][1])
