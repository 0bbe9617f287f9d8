"""Model transforms: checkpointing/offload and compile give the loss and gradients of the plain model, compile does
not recompile on static packed shapes, and the fp8 mode fails at start-up where it cannot run."""
import time
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import lift_float8_device_check
from optrush.config import Config, ConfigError, load_config
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.parallel.checkpointing import apply_activation_checkpointing
from optrush.parallel.compile import apply_compile
from optrush.train.float8 import require_float8
from optrush.train.optimizations import apply_optimizations

ARGS = get_preset("debug", n_layers=4)


def packed_batch(seed: int, *, rows: int = 2, length: int = 32) -> dict:
    """A packed-style batch of fixed shape: two documents per row and some padding (document id -1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (rows, length + 1), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * (length - 10), [0] * 20 + [1] * (length - 23) + [-1] * 3])[:rows]
    positions = torch.cat([torch.arange(10), torch.arange(length - 10)]).expand(rows, length)
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], position_ids=positions, document_ids=docs)


def config(**sections) -> Config:
    cfg = Config()
    for key, value in sections.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def loss_and_grads(model, batch, *, on_save=None):
    model.zero_grad(set_to_none=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(on_save, lambda t: t) if on_save else None
    if hooks:
        with hooks:
            loss = model(**batch, reduction="sum")
    else:
        loss = model(**batch, reduction="sum")
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def saved_bytes(model, batch) -> int:
    """Bytes saved for backward as seen from outside the model (inner hooks such as offload take precedence)."""
    total = 0

    def count(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    loss_and_grads(model, batch, on_save=count)
    return total


@pytest.mark.parametrize("sections", [
    dict(activations__checkpointing="full"),
    dict(activations__checkpointing="selective"),
    dict(activations__checkpointing="full", activations__every=2),
    dict(activations__offload=True),
    dict(activations__checkpointing="selective", activations__offload=True),
    dict(activations__checkpointing="full", activations__offload=True, activations__skip_last=2),
], ids=["full", "selective", "full-every-2", "offload", "selective+offload", "full+offload-skip-last-2"])
def test_checkpointing_matches_plain_model(sections):
    torch.manual_seed(0)
    batch = packed_batch(0)
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, seed=0), batch)
    model = apply_activation_checkpointing(build_model(ARGS, seed=0), config(**sections))
    loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(model, batch) -> Counter:
    """Ops run during backward: recomputation shows up as forward ops (matmuls, rsqrt of RMSNorm) here."""
    loss = model(**batch, reduction="sum")
    with CountOps() as mode:
        loss.backward()
    return mode.calls


def test_checkpointing_policies_recompute_what_they_should_and_keep_parameter_names():
    batch = packed_batch(0)
    plain = build_model(ARGS, seed=0)
    ops = {"none": backward_ops(plain, batch)}
    for policy in ("selective", "full"):
        model = apply_activation_checkpointing(build_model(ARGS, seed=0), config(activations__checkpointing=policy))
        ops[policy] = backward_ops(model, batch)
        assert list(model.state_dict()) == list(plain.state_dict())
    assert ops["none"]["aten::rsqrt"] == 0
    assert ops["selective"]["aten::rsqrt"] > 0 and ops["selective"]["aten::mm"] == ops["none"]["aten::mm"]
    assert ops["full"]["aten::rsqrt"] > 0 and ops["full"]["aten::mm"] > ops["none"]["aten::mm"]


def test_selective_policy_keeps_the_mlp_chunks_matmul_outputs_so_the_config_refuses_the_pair(monkeypatch):
    """The block's selective policy also saves the gate/up matmul outputs inside every MLP chunk's own checkpoint,
    so MLP chunks free nothing under it (33.6 GiB at 65,536 tokens on the 1B shape, memory_peak.md): the config
    refuses the combination at start-up, naming both keys."""
    from optrush.parallel import checkpointing

    kept_widths = []

    def recording_policy(ctx, func, *args, **kwargs):
        if func.name() in checkpointing.SAVED_OPS and func.name() in ("aten::mm", "aten::addmm"):
            kept_widths.append(args[-1].shape[-1])
        return checkpointing.CheckpointPolicy.MUST_SAVE if func.name() in checkpointing.SAVED_OPS \
            else checkpointing.CheckpointPolicy.PREFER_RECOMPUTE

    monkeypatch.setattr(checkpointing, "save_costly_ops", recording_policy)
    cfg = config(activations__checkpointing="selective", activations__mlp_chunk_tokens=16)
    loss_and_grads(apply_activation_checkpointing(build_model(ARGS, seed=0), cfg), packed_batch(0))
    assert kept_widths.count(ARGS.ffn_dim) >= 2 * ARGS.n_layers * 4  # gate and up of each 16-token chunk
    with pytest.raises(ConfigError, match="activations.mlp_chunk_tokens=16 with activations.checkpointing=selective"):
        load_config(None, ["model.preset=debug", "data.tokenizer=tok", "activations.checkpointing=selective",
                           "activations.mlp_chunk_tokens=16"])


def test_skip_last_leaves_the_last_blocks_unchecked():
    """activations.skip_last=n: the last n blocks recompute nothing (each checkpointed block re-runs 6 of its 7
    matmuls in backward: not down_proj, whose output backward does not need), and skipping every block is no
    checkpointing at all."""
    batch = packed_batch(0)
    mm = {}
    for skip in (0, 1, ARGS.n_layers, ARGS.n_layers + 5):
        cfg = config(activations__checkpointing="full", activations__skip_last=skip)
        mm[skip] = backward_ops(apply_activation_checkpointing(build_model(ARGS, seed=0), cfg), batch)["aten::mm"]
    plain = backward_ops(build_model(ARGS, seed=0), batch)["aten::mm"]
    assert mm[0] - mm[1] == 6 and mm[ARGS.n_layers] == mm[ARGS.n_layers + 5] == plain


def test_selective_checkpointing_recomputes_lora_low_rank_products_exactly():
    """Each adapter's (x A) B is as large as the base linear's output: selective checkpointing recomputes it (one
    extra small matmul per adapted linear whose output backward needs) instead of keeping it, with the same gradients."""
    from optrush.config.schema import PeftConfig
    from optrush.peft.lora import apply_lora

    batch = packed_batch(0)

    def lora_model():
        torch.manual_seed(0)  # the same adapters every time
        model = apply_lora(build_model(ARGS, seed=0), PeftConfig(method="lora", r=4, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(param, std=0.02)  # non-zero, so that A gets a gradient too
        return model

    def adapter_grads(model):
        model(**batch, reduction="sum").backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain = lora_model()
    selective = apply_activation_checkpointing(lora_model(), config(activations__checkpointing="selective"))
    ref_grads, grads = adapter_grads(lora_model()), adapter_grads(selective)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * ARGS.n_layers * 7
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # every adapter's product but the block's last (down_proj's, which only feeds the residual sum, so the
    # recomputation stops before it)
    recomputed = ARGS.n_layers * 6
    assert backward_ops(selective, batch)["aten::mm"] == backward_ops(plain, batch)["aten::mm"] + recomputed


def test_selective_checkpointing_recomputes_qlora_quantized_matmuls():
    """Under QLoRA, selective checkpointing keeps attention's output and recomputes every quantized base matmul
    (optrush::dequantized_matmul is not in SAVED_OPS: keeping its outputs would spend what quantizing saved), as
    full checkpointing does; `optrush.plan.memory` models exactly this."""
    from optrush.config.schema import PeftConfig
    from optrush.peft.lora import apply_lora
    from optrush.peft.quant import apply_quantize

    batch = packed_batch(0)

    def qlora_model(policy):
        torch.manual_seed(0)
        model = apply_lora(build_model(ARGS, seed=0), PeftConfig(method="lora", r=4, target_modules="all-linear"))
        model = apply_quantize(model, config(peft__quantize="nf4"))
        return apply_activation_checkpointing(model, config(activations__checkpointing=policy))

    ops = {policy: backward_ops(qlora_model(policy), batch) for policy in ("none", "selective", "full")}
    recomputed = {policy: calls["optrush::dequantized_matmul"] for policy, calls in ops.items()}
    assert recomputed == {"none": 0, "selective": ARGS.n_layers * 7, "full": ARGS.n_layers * 7}
    attention = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert ops["selective"][attention] == 0 < ops["full"][attention]  # kept, not recomputed


def test_offload_moves_block_activations_to_the_offload_hooks():
    batch = packed_batch(0)
    plain, offloaded = build_model(ARGS, seed=0), build_model(ARGS, seed=0)
    apply_activation_checkpointing(offloaded, config(activations__offload=True))
    # tensors the blocks save go to the (inner) save_on_cpu hooks, so an outer hook sees only the rest
    assert saved_bytes(offloaded, batch) < saved_bytes(plain, batch) / 4


def test_compiled_blocks_match_eager_and_do_not_recompile():
    torch._dynamo.reset()
    counters.clear()
    eager = build_model(ARGS, seed=0)
    compiled = apply_compile(build_model(ARGS, seed=0), config(compile__mode="blocks"))
    started = time.perf_counter()
    for step in range(3):  # new tokens every step, same (packed, static) shapes
        batch = packed_batch(step)
        ref_loss, ref_grads = loss_and_grads(eager, batch)
        loss, grads = loss_and_grads(compiled, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # one graph serves all four blocks and all three steps
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    print(f"compile test: {time.perf_counter() - started:.1f}s")


def test_compile_memory_budget_saves_less_for_backward_with_the_same_gradients():
    """compile.memory_budget=0 makes the compiled model keep only its inputs for backward and recompute the rest;
    loss and gradients stay those of eager. The budget is set for this compile only: torch's process-wide flag
    is back at its default afterwards."""
    from torch._functorch import config as functorch_config

    torch._dynamo.reset()
    batch = packed_batch(0)
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, seed=0), batch)
    saved = {}
    for budget in (1.0, 0.0):
        model = apply_compile(build_model(ARGS, seed=0), config(compile__mode="model", compile__memory_budget=budget))
        loss, grads = loss_and_grads(model, batch)  # compiles outside the counting hooks
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        saved[budget] = saved_bytes(model, batch) - sum(p.numel() * p.element_size() for p in model.parameters())
        assert functorch_config.activation_memory_budget == 1.0
    assert saved[0.0] < saved[1.0] / 4, saved


@pytest.mark.slow
def test_compiled_blocks_with_varying_lengths_compile_at_most_twice():
    """Padded (unpacked) batches change length every step: dynamic=null compiles the first shape, then once more
    with a symbolic length that serves all later ones."""
    torch._dynamo.reset()
    counters.clear()
    eager = build_model(ARGS, seed=0)
    compiled = apply_compile(build_model(ARGS, seed=0), config(compile__mode="blocks"))
    started = time.perf_counter()
    for length in (24, 31, 40, 17):
        tokens = torch.randint(0, ARGS.vocab_size, (2, length + 1), generator=torch.Generator().manual_seed(length))
        batch = dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        ref_loss, _ = loss_and_grads(eager, batch)
        loss, _ = loss_and_grads(compiled, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    print(f"dynamic compile test: {time.perf_counter() - started:.1f}s")


def test_optimizations_apply_in_order_and_log_once(capsys):
    cfg = config(activations__checkpointing="full", activations__offload=True)
    model = apply_optimizations(build_model(ARGS, seed=0), cfg)
    out = capsys.readouterr().out
    assert out.count("model transform:") == 1 and "full activation checkpointing" in out and "offloaded" in out
    assert list(model.state_dict()) == list(build_model(ARGS, seed=0).state_dict())
    apply_optimizations(build_model(ARGS, seed=0), Config())
    assert capsys.readouterr().out == ""


def test_config_accepts_transforms_and_rejects_bad_combinations():
    base = ["model.preset=debug", "data.tokenizer=tok"]
    cfg = load_config(None, base + ["compile.mode=blocks", "activations.checkpointing=selective",
                                    "activations.every=2", "activations.offload=true", "precision.mode=fp8"])
    assert cfg.compile.mode == "blocks" and cfg.activations.every == 2 and cfg.precision.mode == "fp8"
    with pytest.raises(ConfigError, match="activations.offload=true needs compile.mode=blocks or none"):
        load_config(None, base + ["compile.mode=model", "activations.offload=true"])
    with pytest.raises(ConfigError, match=r"compile.memory_budget=1.5: must be in \[0, 1\]"):
        load_config(None, base + ["compile.mode=model", "compile.memory_budget=1.5"])
    with pytest.raises(ConfigError, match="compile.memory_budget=0.5 tells torch.compile what to recompute"):
        load_config(None, base + ["compile.memory_budget=0.5"])
    with pytest.raises(ConfigError, match="activations.every=0: must be >= 1"):
        load_config(None, base + ["activations.every=0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
@pytest.mark.parametrize("mode, instead", [("fp8", "bf16_mixed"), ("fp8_pure", "bf16_pure")])
def test_fp8_without_gpu_fails_at_start_up(mode, instead):
    with pytest.raises(ConfigError, match=f"precision.mode={mode} needs an NVIDIA GPU with FP8 tensor cores .*; "
                                          f"use precision.mode={instead}$"):
        require_float8(torch.device("cpu"), mode)


def test_fp8_pure_is_bf16_pure_with_float8_block_linears():
    """fp8_pure stores bf16 weights and runs without autocast, as bf16_pure; fp8 keeps fp32 weights under
    autocast, as bf16_mixed; both put the float8 transform in the transform list."""
    from optrush.train.loop import precision_context
    from optrush.train.optimizations import enabled_transforms

    for mode, like in (("fp8_pure", "bf16_pure"), ("fp8", "bf16_mixed")):
        cfg, same = config(precision__mode=mode), config(precision__mode=like)
        assert cfg.precision.bf16_weights == same.precision.bf16_weights
        assert cfg.precision.autocast == same.precision.autocast
        assert type(precision_context(cfg, torch.device("cpu"))) is type(precision_context(same, torch.device("cpu")))
        assert [name for name, _ in enabled_transforms(cfg)][0].startswith("float8 training linears")
        assert not enabled_transforms(same)
    base = ["model.preset=debug", "precision.mode=fp8_pure"]
    assert load_config(None, base + ["optim.bf16_update=kahan"], synthetic_data=True).precision.float8
    with pytest.raises(ConfigError, match="peft.method=lora/dora with precision.mode=fp8_pure is not supported yet"):
        load_config(None, base + ["peft.method=lora"], synthetic_data=True)


@pytest.mark.parametrize("mode, like", [("fp8_pure", "bf16_pure"), ("fp8", "bf16_mixed")])
def test_float8_trains_close_to_its_bf16_mode_and_resumes_exactly(mode, like, debug_overrides, tmp_path, monkeypatch):
    """The training loop with float8 block linears: the losses of its bf16 mode within float8's precision, and a
    resume from a mid-run checkpoint equal to the uninterrupted run (the Float8Linear weights save and load under
    their own names; fp8_pure's optimizer state is laid out for bf16 weights)."""
    from optrush.train import train

    lift_float8_device_check(monkeypatch)
    common = debug_overrides + ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=2", "train.lr=1e-3"]
    reference = train(load_config(None, common + [f"precision.mode={like}", f"output_dir={tmp_path / like}"]))
    full = train(load_config(None, common + [f"precision.mode={mode}", f"output_dir={tmp_path / mode}"]))
    assert full["losses"] == pytest.approx(reference["losses"], rel=2e-3)  # measured: within 2e-4
    assert full["losses"] != reference["losses"]  # the float8 matmuls did run
    checkpoint = tmp_path / mode / "checkpoints" / "step_00000002"
    resumed = train(load_config(None, common + [f"precision.mode={mode}", f"output_dir={tmp_path / 'resumed'}",
                                                f"checkpoint.resume={checkpoint}"]))
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=0)


def test_fp8_pure_compiles_with_the_fused_loss(monkeypatch):
    """Compiled blocks with float8 linears and the fused loss (Inductor on CPU): the eager fp8_pure losses."""
    from optrush.bench.run import bench

    lift_float8_device_check(monkeypatch)
    base = ["model.preset=debug", "precision.mode=fp8_pure", "train.device=cpu", "data.max_length=64",
            "train.micro_batch_size=2", "kernels.fused_loss=true"]
    eager, compiled = (bench(load_config(None, base + extra, synthetic_data=True), synthetic=True, warmup=1, steps=2)
                       for extra in ([], ["compile.mode=blocks"]))
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-3)


# ------------------------------------------------------------------------------------------------------------ GPU

def gpu_batch(seed: int, *, rows: int = 2, length: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (rows, length + 1), generator=g)
    return {k: v.cuda() for k, v in dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sections", [
    dict(activations__checkpointing="selective", compile__mode="blocks"),
    dict(activations__checkpointing="full", compile__mode="blocks"),
    dict(activations__offload=True),
    dict(activations__checkpointing="full", activations__offload=True, compile__mode="blocks"),
    dict(compile__mode="model"),
], ids=["selective+compile", "full+compile", "offload", "full+offload+compile", "compile-model"])
def test_gpu_transforms_match_eager_in_bf16(sections):
    torch._dynamo.reset()
    batch = gpu_batch(0)
    ref_loss, ref_grads = loss_and_grads(build_model(ARGS, dtype=torch.bfloat16, device="cuda", seed=0), batch)
    model = apply_optimizations(build_model(ARGS, dtype=torch.bfloat16, device="cuda", seed=0), config(**sections))
    for _ in range(2):
        loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, grad in ref_grads.items():
        assert relative_error(grads[name], grad) < 5e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["fp8", "fp8_pure"])
def test_gpu_fp8_trains_close_to_bf16(mode):
    """float8 block linears against the same model in bf16: fp8 over fp32 weights under autocast (as bf16_mixed),
    fp8_pure over bf16 weights without it (as bf16_pure)."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    torch._dynamo.reset()
    batch = gpu_batch(0, length=512)
    from optrush.train.loop import param_dtype

    cfg = config(precision__mode=mode, compile__mode="blocks")
    dtype = param_dtype(cfg)
    precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.precision.autocast)
    ref = build_model(ARGS, dtype=dtype, device="cuda", seed=0)
    with precision:
        ref_loss, ref_grads = loss_and_grads(ref, batch)
    model = apply_optimizations(build_model(ARGS, dtype=dtype, device="cuda", seed=0), cfg)
    assert type(model.layers[0].attention.wq).__name__ == "Float8Linear"
    assert type(model.output).__name__ == "Linear"
    assert model.layers[0].attention.wq.weight.dtype == dtype
    with precision:
        loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, grad in ref_grads.items():
        assert relative_error(grads[name], grad) < 0.15, name
