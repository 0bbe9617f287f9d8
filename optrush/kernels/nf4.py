"""NF4 dequantization as one hand-written Triton kernel (CUDA), for `kernels.fused_dequantize`.

    weight = nf4_dequantize_triton(codes, absmax_q, absmax_scale, absmax_mean, pair_levels,
                                   rows=4096, cols=4096, dtype=torch.bfloat16)

The same function as `optrush.peft.quant.nf4_dequantize` (its arguments are an `NF4Weight`'s stored tensors): each
program decodes whole NF4 blocks, 32 bytes of codes into 64 weights, with one vector load of the codes, one
absmax per block, one 8-byte table load per byte (both of its levels) and contiguous stores. Inductor's kernel for
the reference formula computes each output element on its own (a byte load, a gather and an index division per
element) and reached about 1.2 TB/s on an H100 in a QLoRA step (`benchmarks/results/profile_h100.md`), where the
dequantization moves 2.5 bytes per weight and runs twice per linear layer and step; `benchmarks/dequantize.py`
measures both (`benchmarks/results/dequantize_h100.md`: 1.1-1.2x the compiled reference's speed at the 8B shapes
with the first version of this kernel; the committed one is faster again, `dequantize_variants_h100.json`).

A custom op, so that torch.compile treats it as one opaque call inside a compiled backward graph (the quantized
matmul's backward dequantizes again), with a fake implementation for tracing. Only CUDA has it; callers check
`available(device)` and use the reference elsewhere.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference dequantization is used
    triton = None

BLOCKS_PER_PROGRAM, WARPS = 128, 8
"""NF4 blocks (of 64 weights) each program decodes (16 KiB of bf16 output), and its warps: the fastest of 16-128
blocks x 4 or 8 warps at the 8B shapes on an H100 (about 13% above 32 x 4 on the MLP's weights)."""


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _nf4_dequantize_kernel(codes_ptr, absmax_q_ptr, scale_ptr, mean_ptr, pair_bits_ptr, out_ptr,
                               n_blocks, numel, SCALE_BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        in_range = blocks < n_blocks
        codes = tl.load(codes_ptr + blocks[:, None] * 32 + tl.arange(0, 32)[None, :], mask=in_range[:, None],
                        other=0).to(tl.int32)
        # the double-quantized block maximum, decoded as the reference does: int8 x group scale + mean, in fp32
        absmax = tl.load(absmax_q_ptr + blocks, mask=in_range, other=0).to(tl.float32) \
            * tl.load(scale_ptr + blocks // SCALE_BLOCK, mask=in_range, other=0.0) + tl.load(mean_ptr)
        # one 8-byte gather per byte: its two fp32 levels, the high nibble's in the low half (little-endian)
        pair = tl.load(pair_bits_ptr + codes)
        high = pair.to(tl.int32).to(tl.float32, bitcast=True) * absmax[:, None]
        low = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True) * absmax[:, None]
        values = tl.interleave(high, low)
        offsets = blocks[:, None] * 64 + tl.arange(0, 64)[None, :]
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < numel)


@torch.library.custom_op("optrush::nf4_dequantize", mutates_args=())
def nf4_dequantize_triton(codes: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                          absmax_mean: torch.Tensor, pair_levels: torch.Tensor, rows: int, cols: int,
                          dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    n_blocks = codes.shape[0]
    grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
    pair_bits = pair_levels.view(torch.int64)  # (256, 2) fp32 -> (256, 1): a byte's two levels in one load
    scale_block = absmax_q.numel() // absmax_scale.numel()  # block maxima per group (padded to whole groups)
    _nf4_dequantize_kernel[grid](codes, absmax_q, absmax_scale, absmax_mean, pair_bits, out, n_blocks,
                                 out.numel(), SCALE_BLOCK=scale_block, BLOCKS=BLOCKS_PER_PROGRAM, num_warps=WARPS)
    return out


@nf4_dequantize_triton.register_fake
def _(codes, absmax_q, absmax_scale, absmax_mean, pair_levels, rows, cols, dtype):
    return codes.new_empty((rows, cols), dtype=dtype)
