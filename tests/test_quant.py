"""Quantized frozen bases (optrush.peft.quant): NF4 is the QLoRA format (levels, blocks, double quantization, 4.127
bits), int8 rounds within half a step, the matmul never keeps a dequantized weight, QLoRA trains only the adapters
and resumes exactly, merged export == dequantized base + adapter, and a checkpoint loads straight into NF4 with
peak memory of about the quantized model."""
import importlib
import shutil
import weakref
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from optrush.config import ConfigError, load_config
from optrush.config.schema import Config, PeftConfig
from optrush.models.io import build_model, load_model, save_model
from optrush.models.presets import get_preset
from optrush.peft import apply_lora, merge_lora, save_merged
from optrush.peft.lora import LoRALinear
from optrush.peft.quant import (BLOCK, NF4_LEVELS, SCALE_BLOCK, QuantizedLinear, QuantizedWeight, apply_quantize,
                                compiled_dequantize, error_bound, linear, quantize_weight, quantized_nbytes)
from optrush.train.optimizations import apply_optimizations

VOCAB = 128
HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


def qlora_model(method: str = "nf4", *, seed: int = 0, n_layers: int = 2):
    cfg = Config()
    cfg.peft = PeftConfig(method="lora", r=4, alpha=8, quantize=method)
    model = build_model(get_preset("debug", vocab_size=VOCAB, n_layers=n_layers), seed=seed)
    apply_lora(model, cfg)
    with torch.no_grad():  # a non-zero adapter, so the tests see it
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return apply_quantize(model, cfg), cfg


def dequantized_copy(model):
    """The reference: the same model with every quantized weight replaced by its dequantized dense matrix."""
    import copy
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, LoRALinear) and isinstance(module.weight, QuantizedWeight):
            module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
        elif isinstance(module, QuantizedLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
            dense.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent), leaf, dense)
    return ref


def ids(seed: int = 1, T: int = 10):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    # bitsandbytes' create_normal_map: 8 positive and 7 negative N(0,1) quantiles, an exact zero, scaled to [-1, 1]
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels / levels.max(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(96, 64), (10, 7)])  # (10, 7): not a multiple of the block, padded
def test_nf4_round_trip_is_the_reference_definition(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    w[0, :3] = 0.0  # exact zeros stay exact
    q = quantize_weight(w, method="nf4")
    got = q.dequantize()
    # reference, written out independently: absmax per 64-block; double quantization to int8 per 256 maxima
    flat = torch.nn.functional.pad(w.flatten(), (0, -w.numel() % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(1)
    centred = torch.nn.functional.pad(absmax - absmax.mean(), (0, -absmax.numel() % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    step = centred.abs().amax(1, keepdim=True) / 127
    decoded = ((centred / step).round() * step).flatten()[:absmax.numel()] + absmax.mean()
    assert (decoded - absmax).abs().max() <= step.max() / 2 + 1e-9
    levels = torch.tensor(NF4_LEVELS)
    nearest = (flat / decoded[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1)
    expected = (levels[nearest] * decoded[:, None]).flatten()[:w.numel()].view(shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert torch.equal(got[0, :3], torch.zeros(3))
    # the format's bound: half the widest gap between levels times the block scale, plus the scale's own error
    bound = HALF_GAP * absmax + (decoded - absmax).abs()
    error = torch.nn.functional.pad((got - w).flatten(), (0, -w.numel() % BLOCK)).view(-1, BLOCK).abs()
    assert (error <= bound[:, None] + 1e-7).all()
    assert ((got - w).abs() <= error_bound(w, method="nf4")).all()


def torchao_to_nf4():
    """torchao's NF4 constructor: in torchao.quantization, or torchao.dtypes.nf4tensor (0.15, on the GPU image)."""
    for name in ("torchao.quantization", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(name).to_nf4
        except (ImportError, AttributeError):
            pass
    raise AssertionError("torchao has no to_nf4 in torchao.quantization nor torchao.dtypes.nf4tensor")


def test_nf4_matches_torchao_where_installed():
    pytest.importorskip("torchao")
    to_nf4 = torchao_to_nf4()
    torch.manual_seed(0)
    w = torch.randn(512, 256) * 0.02
    ours = quantize_weight(w, method="nf4").dequantize()
    theirs = to_nf4(w).get_original_weight()  # torchao rounds the levels to 4 decimals
    rel = lambda d: float((d - w).norm() / w.norm())
    assert rel(ours) <= rel(theirs) * 1.001
    assert float((ours - theirs).norm() / w.norm()) < 0.02


def test_double_quantization_costs_4_127_bits_per_weight():
    w = torch.randn(1024, 1024)
    bits = 8 * quantize_weight(w, method="nf4").nbytes() / w.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # 4.127
    assert 8 * quantize_weight(w, method="int8").nbytes() / w.numel() == pytest.approx(8 + 32 / 1024)


def test_int8_round_trip_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    got = quantize_weight(w, method="int8").dequantize()
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((got - w).abs() <= step / 2 + 1e-6).all()
    assert ((got - w).abs() <= error_bound(w, method="int8")).all()


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantized_matmul_grads_and_no_saved_dense_weight(method, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    w = torch.randn(64, 128, device=device)
    q = quantize_weight(w, method=method)
    x = torch.randn(3, 5, 128, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = linear(x, q)
    assert not any(t.is_floating_point() and t.numel() >= w.numel() for t in saved), \
        "a full-precision weight was saved for the backward pass"
    grad = torch.randn_like(out)
    out.backward(grad)
    dense = q.dequantize()
    torch.testing.assert_close(out, x.detach() @ dense.T)
    torch.testing.assert_close(x.grad, grad @ dense)
    x.grad = None  # under activation checkpointing (which allows one unpack of the saved tensors) too
    torch.utils.checkpoint.checkpoint(linear, x, q, use_reentrant=False).backward(grad)
    torch.testing.assert_close(x.grad, grad @ dense)
    if method == "int8":  # weight-only int8: the forward stays within a small relative error of the dense one
        assert float((out.detach() - x.detach() @ w.T).norm() / (x.detach() @ w.T).norm()) < 1e-2


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_forward_equals_dequantized_base_lora(method):
    model, _ = qlora_model(method)
    blocks = [m for n, m in model.named_modules() if n.startswith("layers.")]
    assert not any(type(m) is torch.nn.Linear for m in blocks)  # every block linear is quantized
    assert isinstance(model.output, torch.nn.Linear) and isinstance(model.output.weight, torch.nn.Parameter)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dequantized_copy(model)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(model)


def test_qlora_dora_zero_init_leaves_the_quantized_base_unchanged():
    """DoRA's magnitude starts from the dequantized weight it computes with, so B = 0 changes nothing."""
    cfg = Config(peft=PeftConfig(method="dora", r=4, alpha=8, quantize="nf4"))
    base = apply_quantize(build_model(get_preset("debug", vocab_size=VOCAB), seed=0), cfg)
    adapted = apply_quantize(apply_lora(build_model(get_preset("debug", vocab_size=VOCAB), seed=0), cfg), cfg)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x), rtol=1e-6, atol=1e-6)


def test_qlora_merged_export_equals_dequantized_base_plus_adapter(tmp_path):
    """The live model's merged save and `optrush export --merge` of its adapter (base quantized again from disk)
    both give the QLoRA forward: the dequantized base plus the adapter."""
    from optrush.peft.export import export_checkpoint, save_adapter

    save_model(build_model(get_preset("debug", vocab_size=VOCAB), seed=0), tmp_path / "base")
    model, _ = qlora_model("nf4")  # the same seeded base weights
    x = ids()
    with torch.no_grad():
        ours = model(x)
    save_merged(model, tmp_path / "merged")
    assert any(isinstance(m, QuantizedWeight) for m in model.modules())  # the live model stays quantized
    save_adapter(model, tmp_path / "adapter", base_model_path=str(tmp_path / "base"))
    export_checkpoint(tmp_path / "adapter", out=tmp_path / "exported", merge=True)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "exported")(x), ours, rtol=1e-5, atol=1e-5)


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage alive, and the peak, for every tensor torch ops create inside the block."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.seen:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.live -= size
        self.seen.discard(key)


def test_checkpoint_loads_straight_into_nf4_with_quantized_peak_memory(tmp_path):
    args = get_preset("debug", vocab_size=VOCAB, n_layers=8, max_seq_len=64)  # RoPE tables negligible
    dense = build_model(args, seed=0)
    save_model(dense, tmp_path / "base")
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    dense_bytes = nbytes([*dense.parameters(), *dense.buffers()])
    largest = max(p.numel() * p.element_size() for n, p in dense.named_parameters() if n.startswith("layers."))
    with LiveBytes() as meter:
        model = load_model(tmp_path / "base", quantize="nf4")
    assert quantized_nbytes(model) < dense_bytes / 6
    # what the quantized model holds plus transients of about one weight matrix: the file's copy, the dense copy
    # (and the previous one, until its name is rebound), the quantization temporaries (fp32 and int32 per weight)
    bound = nbytes([*model.parameters(), *model.buffers()]) + 8 * largest
    assert meter.peak <= bound < dense_bytes, (meter.peak, bound, dense_bytes)
    reference = apply_quantize(build_model(args, seed=0), Config(peft=PeftConfig(method="lora", quantize="nf4")))
    for (name, a), b in zip(model.named_modules(), reference.modules()):
        if isinstance(a, QuantizedWeight):
            assert torch.equal(a.dequantize(), b.dequantize()), name


def test_qlora_config_validation(debug_overrides):
    with pytest.raises(ConfigError, match="peft.quantize=nf4"):
        load_config(None, debug_overrides + ["peft.quantize=nf4"])
    with pytest.raises(ConfigError, match="lm_head"):
        load_config(None, debug_overrides + ["peft.method=lora", "peft.target_modules=[q_proj, lm_head]"])
    assert load_config(None, debug_overrides + ["peft.method=dora", "peft.quantize=int8"]).peft.quantize == "int8"


def test_qlora_trains_only_adapters_and_resumes_exactly(tmp_path):
    """Train 2 steps straight vs 1 step, save (PEFT adapter + optimizer state, as checkpoints do), rebuild the
    quantized model from scratch, restore, 1 more step: same losses, since the quantized base is rebuilt bit for
    bit. Only the adapters are trainable and receive gradients, and the loss goes down."""
    from optrush.peft.export import load_adapter_weights, save_adapter

    x = ids(T=16)

    def steps(model, optimizer, n):
        losses = []
        for _ in range(n):
            loss = model(x, labels=x)
            loss.backward()
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    def fresh():
        torch.manual_seed(0)  # the adapters' A init draws from the global RNG, as in training
        model, _ = qlora_model("nf4")
        assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    straight = steps(*fresh(), 2)
    assert straight[-1] < straight[0]
    model, optimizer = fresh()
    first = steps(model, optimizer, 1)
    save_adapter(model, tmp_path / "adapter")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    model, optimizer = fresh()
    load_adapter_weights(model, tmp_path / "adapter")
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    assert first + steps(model, optimizer, 1) == straight


def test_check_quantized_rows_pass_and_catch_a_planted_fault(debug_overrides, monkeypatch):
    from optrush.check.harness import prepare
    from optrush.check.runner import check_quantized
    from optrush.peft import quant

    cfg = load_config(None, debug_overrides + ["peft.method=lora", "peft.r=4", "peft.quantize=nf4",
                                               "data.max_length=64"])
    ctx = prepare(cfg)
    bound, forward = check_quantized(ctx)
    assert bound.passed is True and 0.3 < bound.measured <= 1.0  # the bound is tight, not vacuous
    assert forward.passed is True

    real = quant.DEQUANTIZE["nf4"]

    def swapped_nibbles(shape, dtype, codes, *rest):  # the planted fault: the two codes of each byte swapped
        return real(shape, dtype, (codes << 4) | (codes >> 4), *rest)

    monkeypatch.setitem(quant.DEQUANTIZE, "nf4", swapped_nibbles)
    bound, _ = check_quantized(ctx)
    assert bound.passed is False and bound.switch_to_turn_off == "peft.quantize=none"


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_matmul_traces_into_one_compiled_graph(method):
    """Dynamo takes the dequantizing op whole (fullgraph); the aot_eager backend checks the tracing without a C++
    toolchain."""
    torch.manual_seed(0)
    q = quantize_weight(torch.randn(64, 128), method=method)
    x = torch.randn(4, 128, requires_grad=True)
    compiled = torch.compile(lambda x: linear(x, q).square().sum(), backend="aot_eager", fullgraph=True)
    compiled(x).backward()
    expected = 2 * (x.detach() @ q.dequantize().T) @ q.dequantize()
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_compiled_dequantize_equals_eager(method):
    """The one-kernel dequantization of kernels.fused_dequantize equals the eager one up to rounding (inductor may
    contract the block maxima's decode into a fused multiply-add)."""
    q = quantize_weight(torch.randn(96, 256, generator=torch.Generator().manual_seed(0)), method=method)
    for dtype in (torch.float32, torch.bfloat16):
        expected = q.dequantize(dtype)
        got = compiled_dequantize(method)(q.shape, dtype, *q.stored())
        torch.testing.assert_close(got, expected)


@pytest.mark.gpu
def test_triton_nf4_dequantize_equals_the_reference():
    """optrush.kernels.nf4 (kernels.fused_dequantize on CUDA) decodes every weight as the reference does, also for a
    weight count that is not a multiple of the 64-weight block and more blocks than one double-quantization group;
    the output starts poisoned (NaN), so an unwritten element fails."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optrush.kernels import nf4

    for shape in [(10, 100), (300, 1000), (1024, 4096)]:
        q = quantize_weight(torch.randn(shape, device="cuda"), method="nf4")
        for dtype in (torch.float32, torch.bfloat16):
            expected = q.dequantize(dtype)
            torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # freed at once: the output reuses it
            got = nf4.nf4_dequantize_triton(*q.stored(), *q.shape, dtype)
            assert not got.isnan().any()
            # equal up to rounding: the kernel may contract the block maxima's decode into a fused multiply-add
            torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)


NEEDS_CXX = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=NEEDS_CXX), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_dequantize_trains_like_the_eager_dequantization(device):
    """kernels.fused_dequantize: compiled blocks with full checkpointing over NF4, the dequantization compiled inside
    the opaque op (CPU) or the Triton kernel (CUDA), give the same losses as the eager dequantization."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    losses = {}
    for fused in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)  # the LoRA A matrices draw from the global generator
        cfg = load_config(None, ["model.preset=debug", f"train.device={device}", "precision.mode=fp32",
                                 "data.max_length=64", "peft.method=lora", "peft.r=4", "peft.quantize=nf4",
                                 "activations.checkpointing=full", "compile.mode=blocks",
                                 f"kernels.fused_dequantize={str(fused).lower()}"], synthetic_data=True)
        model = apply_optimizations(build_model(get_preset("debug", vocab_size=VOCAB), seed=0, device=device), cfg)
        assert all(w.fused_dequantize == fused for w in model.modules() if isinstance(w, QuantizedWeight))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
        losses[fused] = []
        for _ in range(3):
            loss = model(ids, labels=ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[fused].append(float(loss.detach()))
    # equal up to rounding: inductor may contract the block maxima's decode into a fused multiply-add
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def saved_activations(model, ids) -> Counter:
    """Shapes and dtypes of the non-parameter tensors a forward saves for backward that are as long as the batch."""
    saved = Counter()

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(ids.shape):
            saved[(tuple(t.shape), t.dtype)] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids)
    loss.backward()
    return saved


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_checkpointed_qlora_blocks_save_only_what_eager_saves(method, device):
    """compile.mode=blocks + full checkpointing over a quantized base keeps the same activations as eager (the
    block inputs): on an H100 the earlier autograd-function version kept about 3.6x the eager memory at the 8B
    shape, and int8 did not trace inside a block. CPU: aot_eager (no C++ toolchain needed); GPU: inductor."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend = "inductor" if device == "cuda" else "aot_eager"
    overrides = ["model.preset=debug", f"train.device={device}", "precision.mode=bf16_pure", "data.max_length=64",
                 "peft.method=lora", "peft.r=4", f"peft.quantize={method}", "activations.checkpointing=full"]
    ids = torch.randint(0, VOCAB, (2, 64), device=device)
    saved = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build_model(get_preset("debug", vocab_size=VOCAB), dtype=torch.bfloat16, device=device, seed=0)
        model = apply_optimizations(model, load_config(None, overrides, synthetic_data=True))
        if compiled:
            for block in model.layers:
                block.forward = torch.compile(block.forward, backend=backend, fullgraph=True)
        saved[compiled] = saved_activations(model, ids)
    assert saved[True] == saved[False]


def test_quantized_weights_count_in_params_and_flops():
    from optrush.train.metrics import model_params, training_flops_per_token

    model, _ = qlora_model("nf4")
    reference = dequantized_copy(model)  # the same weights as parameters
    assert model.num_params() < reference.num_params() == model_params(model)
    assert training_flops_per_token(model, 64) == reference.flops_per_token(64)


def _state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the quantized codes are non-persistent, so not in state_dict) by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize(("method", "peft_method", "tied", "qkv_bias"),
                         [("nf4", "lora", False, False), ("int8", "dora", True, True)])
def test_quantize_on_build_equals_build_then_quantize(method, peft_method, tied, qkv_bias):
    cfg = Config()
    cfg.peft = PeftConfig(method=peft_method, r=4, alpha=8, quantize=method, target_modules=["q_proj", "down_proj"])
    args = get_preset("debug", vocab_size=VOCAB, n_layers=3, tie_embeddings=tied, qkv_bias=qkv_bias)
    models = []
    for quantize in ("none", method):  # today's path (quantized by the transform), then quantized while built
        torch.manual_seed(7)  # apply_lora draws lora_A from the global RNG
        models.append(apply_quantize(apply_lora(build_model(args, seed=3, quantize=quantize), cfg), cfg))
    old, new = models
    # (the order of registration differs: a LoRALinear's weight became a submodule after its adapters)
    assert sorted((n, type(m).__name__) for n, m in old.named_modules()) == \
        sorted((n, type(m).__name__) for n, m in new.named_modules())
    assert any(isinstance(m, QuantizedLinear) for m in new.modules())
    old_state, new_state = _state(old), _state(new)
    assert old_state.keys() == new_state.keys()
    for name, tensor in old_state.items():
        assert tensor.dtype == new_state[name].dtype and torch.equal(tensor, new_state[name]), name
        if isinstance(tensor, torch.nn.Parameter):
            assert tensor.requires_grad == new_state[name].requires_grad, name
    assert (new.output.weight is new.tok_embeddings.weight) == tied
    assert not any(t.is_meta for t in new_state.values())


def test_quantize_on_build_holds_about_one_block_in_full_precision(monkeypatch):
    """Observed at every random draw of the build: the bytes of dense (not yet quantized) block linear weights
    alive in the model. Quantizing while building keeps one block's; building then quantizing holds all."""
    from optrush.models.llama import Transformer
    from optrush.peft.quant import is_quantizable

    args = get_preset("debug", vocab_size=VOCAB, n_layers=4)
    block = sum(m.weight.nbytes for n, m in build_model(args).named_modules() if is_quantizable(n, m)) // 4
    peaks = []
    draw = Transformer.init_parameter

    def observed(model, name, param, **kw):
        dense = sum(m.weight.nbytes for n, m in model.named_modules()
                    if is_quantizable(n, m) and not m.weight.is_meta)
        peaks[-1] = max(peaks[-1], dense)
        draw(model, name, param, **kw)

    monkeypatch.setattr(Transformer, "init_parameter", observed)
    for quantize in ("none", "nf4"):
        peaks.append(0)
        model = build_model(args, seed=0, quantize=quantize)
    unquantized, quantized = peaks
    assert unquantized >= 3 * block  # the observer sees the dense weights of earlier blocks
    assert block / 2 <= quantized <= block
    assert quantized_nbytes(model) < block  # 4 blocks in NF4 < one block in fp32


def test_dequantize_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/dequantize.py --tiny: the script itself (reference paths, small shapes) writes its table."""
    from conftest import load_benchmark

    record = load_benchmark("dequantize").main(["--tiny", "--repeats", "2", "--out", str(tmp_path), "--name", "dq"])
    assert {r["path"] for r in record["results"]} >= {"eager reference"}
    assert all(r["max_abs_diff_vs_eager"] == 0 for r in record["results"] if r["path"] == "eager reference")
    assert (tmp_path / "dq.md").read_text().count("| q_proj / o_proj |") >= 1
