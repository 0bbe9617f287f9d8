"""LoRA/DoRA/rsLoRA/LoRA+ (optrush.peft): zero-init is a no-op, only adapters train, merge == unmerged, the PEFT
and merged exports load in peft/transformers with equal logits, and a LoRA training run resumes exactly."""
import json

import pytest
import torch

from optrush.config import ConfigError, load_config
from optrush.config.schema import OptimConfig, PeftConfig
from optrush.models.io import build_model, save_model
from optrush.models.presets import get_preset
from optrush.optim.optimizer import build_optimizer
from optrush.models import layers
from optrush.peft import LoRALinear, apply_lora, merge_lora, save_adapter, save_merged, unmerge_lora
from optrush.peft.lora import adapters_disabled, project_shared_input
from optrush.peft.export import ADAPTER_CONFIG, export_checkpoint, load_adapter

VOCAB, T = 128, 12


def tiny_model(seed: int = 0, **overrides):
    model = build_model(get_preset("debug", vocab_size=VOCAB, **overrides), seed=seed)
    with torch.no_grad():  # weights large enough that every term shows in the logits
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.1)
    return model.eval()


def ids(seed: int = 1):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_zero_init_b_leaves_outputs_unchanged():
    torch.manual_seed(0)
    model = tiny_model()
    before = logits(model, ids())
    apply_lora(model, PeftConfig(method="lora", r=4, alpha=8))
    assert isinstance(model.layers[0].attention.wq, LoRALinear)
    assert isinstance(model.layers[1].feed_forward.w2, LoRALinear) and not isinstance(model.output, LoRALinear)
    torch.testing.assert_close(logits(model, ids()), before, rtol=0, atol=0)


def test_only_adapter_params_require_and_get_grads():
    torch.manual_seed(0)
    model = apply_lora(tiny_model(), PeftConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_magnitude") for n in trainable)
    assert all(".wq." in n or ".wv." in n for n in trainable)
    x = ids()
    model(x, labels=x).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_equals_unmerged_forward(method):
    torch.manual_seed(0)
    model = apply_lora(tiny_model(), PeftConfig(method=method, r=4, alpha=8, rslora=True))
    randomize_adapters(model)
    x = ids()
    unmerged = logits(model, x)
    original = model.layers[0].attention.wq.weight.clone()
    merge_lora(model)
    # fp32 rounding of two orders of summation: up to ~1.5e-5 on logits of magnitude ~3
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=3e-5)
    unmerge_lora(model)
    assert torch.equal(model.layers[0].attention.wq.weight, original)
    torch.testing.assert_close(logits(model, x), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "up_proj"]])
def test_shared_input_projection_matches_each_layer(targets, monkeypatch):
    """apply_lora runs the A matrices of layers that read one input (q/k/v, gate/up) as one matmul; the loss and
    every gradient equal those of calling each layer on its own. A group with a non-LoRA member falls back."""
    torch.manual_seed(0)
    model = apply_lora(tiny_model(), PeftConfig(method="lora", r=4, alpha=8, target_modules=targets))
    randomize_adapters(model)
    grouped = [m for m in model.modules() if getattr(m, "project", None) is project_shared_input]
    assert len(grouped) == 2 * len(model.layers)  # each block's attention and MLP
    fallbacks = []
    reference = layers.project
    monkeypatch.setattr(layers, "project", lambda x, *linears: fallbacks.append(1) or reference(x, *linears))
    x = ids()

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, labels=x)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    shared = loss_and_grads()
    assert len(fallbacks) == (0 if targets == "all-linear" else 2 * len(model.layers))
    for module in grouped:
        module.project = reference
    torch.testing.assert_close(shared, loss_and_grads(), rtol=1e-5, atol=1e-6)


def test_shared_input_needs_an_active_plain_lora_layer():
    base = torch.nn.Linear(8, 6)
    assert LoRALinear(base, r=2, alpha=4).shares_input
    assert not LoRALinear(base, r=2, alpha=4, dropout=0.1).shares_input  # one matmul would share the mask
    assert not LoRALinear(base, r=2, alpha=4, dora=True).shares_input
    merged = LoRALinear(base, r=2, alpha=4)
    merged.merge()
    assert not merged.shares_input
    model = apply_lora(tiny_model(), PeftConfig(method="lora", r=4, alpha=8))
    with adapters_disabled(model):
        assert not model.layers[0].attention.wq.shares_input


def test_rslora_scaling_and_dropout_identity_at_zero():
    base = torch.nn.Linear(8, 6)
    assert LoRALinear(base, r=4, alpha=8).scaling == 2.0
    assert LoRALinear(base, r=4, alpha=8, rslora=True).scaling == 4.0
    assert isinstance(LoRALinear(base, r=4, alpha=8).dropout, torch.nn.Identity)


@pytest.mark.parametrize("alpha", [4.0, 7.0])  # scaling 1 (skips the multiply) and 1.75
def test_lora_output_and_gradients_equal_the_formula(alpha):
    """y = x W^T + b + s x A^T B^T, and its gradients, whatever side of B the scaling s is applied on."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, r=4, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    reference = x_ref @ base.weight.T + base.bias + (alpha / 4) * (x_ref @ a.T @ b.T)
    grad = torch.randn(3, 6)
    layer(x).backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(layer(x), reference, rtol=1e-6, atol=1e-6)
    for ours, theirs in ((x.grad, x_ref.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_dora_forward_equals_its_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, alpha=4, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(6) + 0.5)
    x = torch.randn(3, 8)
    w = base.weight + 2.0 * layer.lora_B @ layer.lora_A
    expected = x @ (layer.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), layer.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_round_trip_and_merged_export(method, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_model(qkv_bias=method == "dora", model_type="qwen2" if method == "dora" else "llama")
    save_model(model, tmp_path / "base")
    apply_lora(model, PeftConfig(method=method, r=4, alpha=8, rslora=method == "dora",
                                 target_modules="all-linear"))
    randomize_adapters(model)
    x = ids()
    ours = logits(model, x)
    save_adapter(model, tmp_path / "adapter", base_model_path=str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["use_dora"] == (method == "dora")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)

    save_merged(model, tmp_path / "merged")
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the live model keeps its adapters
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)

    # our own reader gives the same model back, and `optrush export` merges the same way
    from optrush.models.io import load_model
    torch.testing.assert_close(logits(load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter"), x), ours,
                               rtol=1e-5, atol=1e-5)
    from optrush.cli.main import main
    assert main(["export", str(tmp_path / "adapter"), "--merge", "--out", str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "exported"), x), ours, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "adapter"), "--adapter", "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()


def test_lora_plus_param_groups():
    torch.manual_seed(0)
    model = apply_lora(tiny_model(), PeftConfig(method="dora", r=4, alpha=8))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=1e-3, device_type="cpu", lora_plus_ratio=16.0)
    by_name = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lrs.setdefault(by_name[id(p)].rsplit(".", 1)[1], set()).add((group["lr"], group["weight_decay"]))
    assert lrs == {"lora_A": {(1e-3, 0.1)}, "lora_B": {(16e-3, 0.1)}, "lora_magnitude": {(1e-3, 0.0)}}


def test_config_validation(debug_overrides):
    with pytest.raises(ConfigError, match="peft.target_modules"):
        load_config(None, debug_overrides + ["peft.method=lora", "peft.target_modules=[q_proj, qq_proj]"])
    with pytest.raises(ConfigError, match="peft.r=0"):
        load_config(None, debug_overrides + ["peft.method=lora", "peft.r=0"])
    cfg = load_config(None, debug_overrides + ["peft.method=lora", "peft.target_modules=[q_proj, v_proj]"])
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]


def test_lora_training_resumes_exactly_and_saves_final(debug_overrides, tmp_path, capsys):
    from optrush.train import train

    base = [o for o in debug_overrides if not o.startswith(("output_dir", "checkpoint.resume", "train.max_steps"))]
    base += ["peft.method=lora", "peft.r=4", "peft.lora_plus_ratio=4", "peft.dropout=0.1", "checkpoint.every=2",
             "train.deterministic=true", "train.schedule=constant"]  # max_steps differs between the calls
    straight = train(load_config(None, base + [f"output_dir={tmp_path / 'a'}", "train.max_steps=6",
                                               "checkpoint.resume=never"]))
    first = train(load_config(None, base + [f"output_dir={tmp_path / 'b'}", "train.max_steps=4",
                                            "checkpoint.resume=auto"]))
    assert len(first["losses"]) == 4
    assert (tmp_path / "b" / "checkpoints" / "step_00000004" / "adapter" / ADAPTER_CONFIG).is_file()
    capsys.readouterr()
    resumed = train(load_config(None, base + [f"output_dir={tmp_path / 'b'}", "train.max_steps=6",
                                              "checkpoint.resume=auto"]))
    assert "step_00000004 at step 4" in capsys.readouterr().out
    assert resumed["losses"] == straight["losses"]
    assert straight["losses"][-1] < straight["losses"][0]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    export_checkpoint(tmp_path / "a" / "final", out=tmp_path / "x", merge=True)  # base: the preset's, in a/base


def test_prompt_tuning_peft_round_trip_and_loss_alignment(tmp_path):
    """Our soft prompt == peft's PROMPT_TUNING on the transformers model (same logits on the text positions); the
    loss with labels equals the cross-entropy of the returned logits; only the prompt trains."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from optrush.peft.prompt import add_prompt

    torch.manual_seed(0)
    model = tiny_model()
    save_model(model, tmp_path / "base")
    add_prompt(model, num_virtual_tokens=3, init="vocab", seed=0)
    with torch.no_grad():
        model.tok_embeddings.prompt.add_(torch.randn(3, model.args.dim) * 0.1)
    x = ids()
    ours = logits(model, x)
    assert ours.shape == (2, T, VOCAB)
    save_adapter(model, tmp_path / "adapter", base_model_path=str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["peft_type"] == "PROMPT_TUNING"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=x).logits[:, 3:], ours, rtol=1e-5, atol=1e-5)
    from optrush.models.io import load_model
    torch.testing.assert_close(logits(load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter"), x), ours,
                               rtol=0, atol=0)

    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    loss = model(x, labels=labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ours.flatten(0, 1), labels.flatten()))
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"tok_embeddings.prompt"}
    with pytest.raises(ValueError, match="no merged form"):
        save_merged(model, tmp_path / "merged")


def test_prompt_tuning_config_validation(debug_overrides):
    with pytest.raises(ConfigError, match="data.packing=bfd"):
        load_config(None, debug_overrides + ["peft.method=prompt_tuning", "peft.save=adapter", "data.packing=bfd"])
    with pytest.raises(ConfigError, match="peft.save=adapter"):
        load_config(None, debug_overrides + ["peft.method=prompt_tuning", "data.packing=sorted"])
    cfg = load_config(None, debug_overrides + ["peft.method=prompt_tuning", "peft.save=adapter", "data.packing=none",
                                               "peft.num_virtual_tokens=4"])
    assert cfg.peft.num_virtual_tokens == 4



def test_adapter_names_its_base_by_absolute_path(tmp_path, monkeypatch):
    from optrush.generate.load import resolve
    from optrush.models.io import load_model

    model = tiny_model()
    monkeypatch.chdir(tmp_path)
    save_model(model, "runs/base")
    apply_lora(model, PeftConfig(method="lora", r=4))
    randomize_adapters(model)
    save_adapter(model, "runs/lora/adapter", base_model_path="runs/base")
    export_checkpoint("runs/lora/adapter", out="runs/copy", merge=False, base="runs/base")
    for adapter in ("runs/lora/adapter", "runs/copy"):
        config = json.loads((tmp_path / adapter / ADAPTER_CONFIG).read_text())
        assert config["base_model_name_or_path"] == str(tmp_path / "runs" / "base")
    monkeypatch.chdir(tmp_path / "runs")  # elsewhere: the relative path would no longer resolve
    base, adapter, _ = resolve(None, adapter=tmp_path / "runs" / "lora" / "adapter", base=None)
    loaded = load_adapter(load_model(base), adapter).eval()
    torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()))


@pytest.mark.parametrize("save", ["adapter", "both"])
def test_preset_lora_run_saves_its_base_for_the_adapters(save, debug_overrides, tmp_path, monkeypatch):
    from optrush.generate.load import load_for_generation
    from optrush.train import train

    cfg = load_config(None, debug_overrides + ["peft.method=lora", "peft.r=4", f"peft.save={save}",
                                               "train.max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=1"])
    train(cfg)
    run = tmp_path / "run"
    assert (run / "base" / "config.json").is_file() and (run / "base" / "tokenizer.json").is_file()
    for adapter in (run / "final" / "adapter", run / "checkpoints" / "step_00000002" / "adapter"):
        assert json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(run / "base")
    monkeypatch.chdir(tmp_path.parent)
    model, _ = load_for_generation(run / "final")  # the merged model, or (adapter only) the adapter over base/
    adapted, _ = load_for_generation(adapter=run / "final" / "adapter")
    load_for_generation(run / "checkpoints" / "step_00000002")
    if save == "both":  # the merged model trained from the same base
        torch.testing.assert_close(logits(adapted, ids()), logits(model, ids()), atol=1e-5, rtol=1e-4)
        assert (run / "final" / "model.safetensors").is_file()
