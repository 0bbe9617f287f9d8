"""Frozen base weights stored in 4-bit NF4 with double quantization (QLoRA) or 8-bit int8, dequantized per matmul.

    model = apply_quantize(model, cfg)                    # cfg.peft.quantize = nf4 | int8, after apply_lora
    layer = quantize_linear(nn.Linear(4096, 4096), method="nf4")   # -> QuantizedLinear
    w = layer.weight.dequantize(torch.bfloat16)           # the full-precision weight, computed on demand
    y = linear(x, layer.weight, layer.bias)               # x @ dequantize(W)^T + b, for dense or quantized W

NF4 (QLoRA, arXiv:2305.14314, section 3): each block of 64 consecutive weights (row-major) is divided by its
absolute maximum and rounded to the nearest of 16 levels, the quantiles of N(0, 1) rescaled to [-1, 1] with an
exact zero (`NF4_LEVELS`, the values bitsandbytes ships). Double quantization stores the fp32 block maxima as int8:
their mean is subtracted and each group of 256 gets one fp32 scale. Storage per weight: 4 + 8/64 + 32/(64*256)
= 4.127 bits. The codes are chosen against the block maxima *as they will be decoded*, so the double quantization
adds no error of its own beyond a slightly different block scale.
int8: each output row is scaled by its absolute maximum / 127 and rounded (8 bits + one fp32 scale per row).

`linear` dequantizes the weight inside a custom op (`dequantized_matmul`) whose backward dequantizes it again, so
no full-precision copy of a weight outlives its matmul (F.linear on a dequantized weight would keep one per layer
until the backward: a whole bf16 model). The matmul runs in the input's dtype, or autocast's (bf16). The op is opaque
to torch.compile, so its forward dequantizes eagerly (a few elementwise kernels per weight) unless
`kernels.fused_dequantize=true` runs one kernel per weight (`dequantize_stored`: Triton for NF4 on CUDA, in forward
and backward); otherwise its backward is traced and fused by torch.compile in compiled blocks, and runs eagerly
outside them.

Only the linear layers of the transformer blocks are quantized: the embedding, final norm and output head stay in
the training dtype (as QLoRA and bitsandbytes' defaults do: the head is small next to the blocks of an 8B model and
its precision shows directly in the loss).

Sharding (parallel.strategy fsdp/hsdp): the integer storage (NF4 codes and double-quantized block maxima, int8
values) are frozen parameters, which FSDP2 shards on dim 0 and all-gathers per block like any weight, so each of N
ranks holds 1/N of the quantized base (the seed's FSDP+QLoRA); the fp32 scales are small replicated buffers.

Why not torchao's NF4Tensor: its module moved between releases (`torchao.dtypes.nf4tensor` ->
`torchao.quantization`), it rounds the levels to four decimals in the weight's dtype, and it costs a 3.5 s import
and a tensor subclass whose every aten op needs a handler. This module is ~200 lines of plain tensors that run on
any torch >= 2.4, CPU and GPU, and compile.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from optrush.kernels import nf4

BLOCK = 64
"""Weights per NF4 block (one absmax each)."""
SCALE_BLOCK = 256
"""Block maxima per double-quantization group (one fp32 scale each)."""
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
"""The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`); tests rebuild them from the normal quantiles."""
HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
"""Largest rounding error of a normalised weight in NF4: half the widest gap between levels (0.7230 .. 1)."""
METHODS = ("nf4", "int8")
_CHUNK = 1 << 22
"""Weights rounded to codes at a time: bounds the fp32/int32 temporaries for an 8B model's largest matrices."""


class QuantizedWeight(nn.Module):
    """A frozen weight of `shape` stored quantized; `dequantize()` gives it back in `dtype` (its original dtype)."""

    method: str
    fused_dequantize = False
    """Dequantize for the forward matmul with one compiled kernel (kernels.fused_dequantize; set by
    optrush.kernels.apply_kernels)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.shape, self.dtype = torch.Size(shape), dtype

    @property
    def device(self) -> torch.device:
        return self.stored()[0].device

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors `DEQUANTIZE[self.method]` takes after (shape, dtype), in its argument order."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return DEQUANTIZE[self.method](self.shape, dtype or self.dtype, *self.stored())

    def nbytes(self) -> int:
        """Bytes of the quantized representation (what the weight costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.stored())

    def extra_repr(self) -> str:
        return f"{self.method}, shape={tuple(self.shape)}, dtype={self.dtype}"


class NF4Weight(QuantizedWeight):
    method = "nf4"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        flat = weight.detach().flatten().float()
        flat = F.pad(flat, (0, -flat.numel() % BLOCK))  # zeros: exact in NF4, and cut off again on dequantize
        blocks = flat.view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1)
        mean = absmax.mean()
        centred = F.pad(absmax - mean, (0, -absmax.numel() % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
        scale = centred.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        absmax_q = (centred / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        decoded = _decode_absmax(absmax_q, scale, mean)[:blocks.shape[0]]
        codes = torch.empty(blocks.shape[0], BLOCK // 2, dtype=torch.uint8, device=weight.device)
        rows = max(1, _CHUNK // BLOCK)
        for start in range(0, blocks.shape[0], rows):
            codes[start:start + rows] = _nf4_codes(blocks[start:start + rows], decoded[start:start + rows])
        self.codes = _frozen(codes)
        self.absmax_q = _frozen(absmax_q.flatten())
        self.register_buffer("absmax_scale", scale, persistent=False)
        self.register_buffer("absmax_mean", mean, persistent=False)
        self.register_buffer("pair_levels", _pair_levels(weight.device), persistent=False)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.absmax_q, self.absmax_scale, self.absmax_mean, self.pair_levels

    def nbytes(self) -> int:
        # the 2 KiB lookup table is the format's constant, not storage per weight
        return super().nbytes() - self.pair_levels.numel() * self.pair_levels.element_size()


class Int8Weight(QuantizedWeight):
    method = "int8"

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"int8 weight-only quantization takes a matrix, got shape {tuple(weight.shape)}")
        super().__init__(weight.shape, weight.dtype)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.q = _frozen((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale, persistent=False)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale


def _frozen(stored: torch.Tensor) -> nn.Parameter:
    """The integer storage of a quantized weight (NF4 codes and block maxima, int8 values) as a frozen parameter,
    so FSDP2 shards it on dim 0 like any weight (it leaves buffers whole on every rank) and the optimizer and DCP
    checkpoints (`ignore_frozen_params`) skip it. The few fp32 scales stay buffers, replicated: FSDP2's
    MixedPrecisionPolicy would cast a floating-point parameter to bf16 (it leaves integer ones as they are), and
    they cost 4 bytes per 16384 weights (NF4) or per row (int8)."""
    return nn.Parameter(stored, requires_grad=False)


def _nf4_codes(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """(n, BLOCK) fp32 weights and their (n,) block scales -> (n, BLOCK // 2) bytes, two codes each, high first."""
    levels = torch.tensor(NF4_LEVELS, device=blocks.device)
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # nearest level: index of the first midpoint at or above the value (midpoint ties go to the lower level)
    index = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2, out_int32=True).to(torch.uint8)
    return index[:, 0::2] << 4 | index[:, 1::2]


def _decode_absmax(absmax_q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return (absmax_q.view(scale.shape[0], -1).float() * scale[:, None]).flatten() + mean


def _pair_levels(device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 values that each byte holds, so decoding is one gather per byte."""
    levels = torch.tensor(NF4_LEVELS, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((levels[byte >> 4], levels[byte & 15]), dim=1)


def nf4_dequantize(shape: torch.Size, dtype: torch.dtype, codes: torch.Tensor, absmax_q: torch.Tensor,
                   absmax_scale: torch.Tensor, absmax_mean: torch.Tensor, pair_levels: torch.Tensor) -> torch.Tensor:
    absmax = _decode_absmax(absmax_q, absmax_scale, absmax_mean)[:codes.shape[0]]
    values = pair_levels[codes.int()].view(codes.shape[0], BLOCK) * absmax[:, None]
    return values.flatten()[:shape.numel()].view(shape).to(dtype)


def int8_dequantize(shape: torch.Size, dtype: torch.dtype, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


DEQUANTIZE = {"nf4": nf4_dequantize, "int8": int8_dequantize}
FORMATS = {"nf4": NF4Weight, "int8": Int8Weight}


def quantize_weight(weight: torch.Tensor, *, method: str) -> QuantizedWeight:
    if method not in FORMATS:
        raise ValueError(f"peft.quantize={method!r}: choose none, {' or '.join(METHODS)}")
    return FORMATS[method](weight)


@functools.cache
def compiled_dequantize(method: str):
    """`DEQUANTIZE[method]` compiled: one kernel per weight shape."""
    return torch.compile(DEQUANTIZE[method], dynamic=False, fullgraph=True)


def dequantize_stored(method: str, shape: torch.Size, dtype: torch.dtype, stored: list[torch.Tensor], *,
                      fused: bool, backward: bool = False) -> torch.Tensor:
    """The full-precision weight of a quantized matmul. `fused` (kernels.fused_dequantize): one kernel per weight
    instead of the eager chain of gather, scale and cast, which moves about 30 bytes per weight where one kernel
    reads half a byte and writes two. On CUDA, NF4 has a hand-written Triton kernel (optrush.kernels.nf4, a custom
    op that compiled graphs call as it is); otherwise the reference formula is compiled, once per weight shape,
    with the recompile limit lifted (the variants are the model's few weight shapes), except in the op's backward
    (`backward=True`), which takes the reference formula as it is: in compiled blocks torch.compile traces that
    backward and fuses the formula into it."""
    if fused and method == "nf4" and nf4.available(stored[0].device):
        return nf4.nf4_dequantize_triton(*stored, *shape, dtype)
    if not fused or backward:
        return DEQUANTIZE[method](shape, dtype, *stored)
    with torch._dynamo.utils.disable_cache_limit():
        return compiled_dequantize(method)(shape, dtype, *stored)


# An opaque custom op rather than an autograd.Function, so that torch.compile cannot see inside it: a compiled,
# checkpointed block then saves exactly what the backward below asks for. With an autograd.Function dynamo traced
# the dequantization into the joint graph; on an H100 (torch 2.11) compiled blocks with full checkpointing then
# kept 43.7 GiB at the 8B shape and B=4 against 11.9 GiB eager (as if nothing were checkpointed), and int8 failed
# to trace inside a block.
@torch.library.custom_op("optrush::dequantized_matmul", mutates_args=())
def dequantized_matmul(x: torch.Tensor, stored: list[torch.Tensor], method: str, out_features: int,
                       in_features: int, dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """x @ dequantize(W)^T in `dtype`; the backward dequantizes W again instead of saving it (W is frozen)."""
    weight = dequantize_stored(method, torch.Size((out_features, in_features)), dtype, stored, fused=fused)
    return F.linear(x.to(dtype), weight)


@dequantized_matmul.register_fake
def _(x, stored, method, out_features, in_features, dtype, fused):
    return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)


def _save_quantized_weight(ctx, inputs, output) -> None:
    x, stored, method, out_features, in_features, _, fused = inputs
    ctx.save_for_backward(*stored)  # the weight's storage (parameters and buffers), never the activation x
    ctx.method, ctx.shape, ctx.x_dtype, ctx.fused = method, (out_features, in_features), x.dtype, fused


def _dequantized_matmul_backward(ctx, grad: torch.Tensor):
    stored = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
    weight = dequantize_stored(ctx.method, torch.Size(ctx.shape), grad.dtype, list(stored), fused=ctx.fused,
                               backward=True)
    grad_x = (grad @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    return grad_x, [None] * len(stored), None, None, None, None, None


dequantized_matmul.register_autograd(_dequantized_matmul_backward, setup_context=_save_quantized_weight)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a dense or a quantized weight; a quantized one computes in autocast's dtype when it is on."""
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x, weight, bias)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = dequantized_matmul(x, list(weight.stored()), weight.method, *weight.shape, dtype, weight.fused_dequantize)
    return out if bias is None else out + bias


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (a block linear that LoRA does not adapt)."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def quantize_linear(layer: nn.Linear, *, method: str) -> QuantizedLinear:
    return QuantizedLinear(quantize_weight(layer.weight, method=method), layer.bias)


def is_quantizable(name: str, module: nn.Module) -> bool:
    """A linear layer of a transformer block (`layers.<i>....`), the only layers quantization touches."""
    return name.startswith("layers.") and type(module) is nn.Linear


def apply_quantize(model: nn.Module, cfg) -> nn.Module:
    """Quantize the frozen base weights of the blocks' linear layers in place (`cfg.peft.quantize`, a `Config`):
    adapted layers keep their adapters over a quantized base, the other block linears become `QuantizedLinear`.
    Layers already quantized (a model loaded with `load_model(..., quantize=...)`) are left as they are."""
    from optrush.peft.lora import LoRALinear  # lora imports this module

    method = cfg.peft.quantize
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and name.startswith("layers.") \
                and not isinstance(module.weight, QuantizedWeight):
            quantized = quantize_weight(module.weight, method=method)
            del module.weight  # a module cannot take a submodule under the name of one of its parameters
            module.weight = quantized
            if module.lora_magnitude is not None:  # DoRA starts from the weight it computes with, as PEFT does
                with torch.no_grad():
                    module.lora_magnitude.copy_(module.row_norm(module.base_weight()))
        elif is_quantizable(name, module):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, quantize_linear(module, method=method))
    if quantized_nbytes(model) == 0:
        raise ValueError(f"peft.quantize={method}: {type(model).__name__} has no block linear layers (layers.<i>...) "
                         "to quantize; QLoRA needs the native Llama-family model (not one loaded through "
                         "transformers): set peft.quantize=none")
    return model


def error_bound(weight: torch.Tensor, *, method: str) -> torch.Tensor:
    """The largest |w - dequantize(quantize(w))| the format allows at each weight (same shape as `weight`).
    NF4: half the widest gap between levels times the block's absmax a, plus half a step of the double-quantized
    absmax (a weight above the decoded absmax clamps to +-1 and is off by at most that much); int8: half a step of
    the row's scale. Plus one rounding to the weight's dtype, and float slack."""
    w = weight.detach().float()
    if method == "int8":
        bound = (w.abs().amax(dim=1, keepdim=True) / 254).expand_as(w)
    else:
        blocks = F.pad(w.flatten(), (0, -w.numel() % BLOCK)).view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1)
        centred = F.pad(absmax - absmax.mean(), (0, -absmax.numel() % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
        half_step = (centred.abs().amax(dim=1, keepdim=True) / 254).expand_as(centred).flatten()[:absmax.numel()]
        per_block = (HALF_GAP * absmax + half_step) * (1 + 1e-6)
        bound = per_block[:, None].expand_as(blocks).flatten()[:w.numel()].view(w.shape)
    return bound + (w.abs() + bound) * torch.finfo(weight.dtype).eps


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of the model's quantized weights."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))
