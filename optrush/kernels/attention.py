"""Attention over packed batches without a dense (T x T) mask: FlexAttention and variable-length flash attention.

    model.set_attention_backend(FLEX)      # or VARLEN; optrush.kernels.apply_kernels does this for model.attention

Both backends plug into `optrush.models.layers.AttentionBackend`: the model builds the mask description once per
forward pass from `document_ids` and every layer reuses it.

- `flex`: FlexAttention with a document-causal `BlockMask` (https://pytorch.org/blog/flexattention/). Blocks of
  128 x 128 that cross documents are skipped entirely, so packed rows cost what their documents cost. Rows need
  not be a multiple of 128 tokens. It needs a CUDA GPU for training (no CPU backward) and compiles on first use
  (about 9 s on an H100; see /work/shared/gpu/NOTES.md).
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (FlashAttention's variable-length kernel) on the tokens
  flattened to (B * T, H, D), with one segment per document run. CUDA only, bf16/fp16 only.

Measured on an H100 (torch 2.11, bf16, 32 heads, 8 KV heads, head dim 64, forward + backward, GPU kernel time;
benchmarks/results/kernels_h100.md): one row of 8,192 tokens holding 4 documents: flex 1.04 ms, varlen 1.31 ms,
SDPA with the dense mask 7.35 ms (SDPA causal over the whole row, ignoring documents: 2.34 ms); 4 rows of 2,048
tokens of an SFT length mix (28 documents): varlen 0.91 ms, flex 1.19 ms, dense SDPA 2.05 ms. Building the mask
takes 0.2-1.1 ms per batch, once per forward pass.

Both follow `layers.attention_mask` exactly: a token sees earlier tokens of its own document; padding (document id
-1) is a segment of its own, so it never reaches a real token and no row is empty. Documents must be contiguous
runs within a row, which is what packing produces.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from optrush.kernels.lazy_compile import compile_on_first_call, never_traced
from optrush.models.layers import AttentionBackend

# FlexAttention only runs fast compiled: eager it materialises the scores. Compiling happens on first call, and a
# compiled block or model inlines this wrapper into its own graph. Static shapes: on torch 2.11 inductor finds no
# kernel for flex_attention once the sequence length turns symbolic (seen on an H100 at the second padded length),
# so a new length compiles anew; packed rows always have one length.
_flex_attention_compiled = compile_on_first_call(flex_attention, dynamic=False)
_create_block_mask_compiled = compile_on_first_call(create_block_mask, dynamic=False)


# ---------------------------------------------------------------------------------------------------------- flex

def flex_block_mask(document_ids: torch.Tensor | None, *, seq_len: int, sliding_window: int | None = None,
                    device: torch.device | str | None = None) -> BlockMask:
    """Document-causal BlockMask for (B, T) document ids (None: plain causal, shared by every row)."""
    def keep(b, h, q, kv):
        allowed = q >= kv
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q] == document_ids[b, kv])
        if sliding_window is not None:
            allowed = allowed & (q - kv < sliding_window)
        return allowed

    device = document_ids.device if document_ids is not None else torch.device(device or "cpu")
    batch = document_ids.shape[0] if document_ids is not None else None
    return build_block_mask(keep, batch=batch, seq_len=seq_len, device=device)


def build_block_mask(keep, *, batch: int | None, seq_len: int, device: torch.device) -> BlockMask:
    """The BlockMask of mask_mod `keep(b, h, q, kv)` (the same for every head), compiled on CUDA."""
    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    return build(keep, batch, None, seq_len, seq_len, device=device)


def flex_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: BlockMask) -> torch.Tensor:
    """FlexAttention on q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D)."""
    # Under autocast, qk_norm returns fp32 q and k beside bf16 v; the kernel wants one dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    attend = _flex_attention_compiled if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# -------------------------------------------------------------------------------------------------------- varlen

@dataclass(frozen=True, slots=True)
class VarlenMask:
    """The packed layout for `varlen_attn`: segment boundaries over the flattened (B * T) tokens."""
    cu_seqlens: torch.Tensor | None
    """int32 (segments + 1,) start offsets of each segment plus the total; None = one segment per row."""
    max_len: int
    """An upper bound on the longest segment in tokens (the row length: see `varlen_mask`)."""
    window: tuple[int, int]
    """varlen_attn's (left, right) window: (-1, 0) is causal; (W - 1, 0) sees the last W keys."""
    enable_gqa: bool
    """Pass enable_gqa=True for grouped KV heads (`varlen_takes_enable_gqa`)."""


@never_traced  # data-dependent sizes (nonzero): run eagerly, once per forward
def varlen_mask(document_ids: torch.Tensor | None, *, seq_len: int, sliding_window: int | None = None,
                device: torch.device | str | None = None) -> VarlenMask:
    """Segments for (B, T) document ids: a new segment starts at each row start and each change of id.

    Built for compiled blocks to take batch after batch without recompiling: `cu_seqlens` is marked dynamic in its
    length (the number of documents changes from batch to batch), and `max_len` is the row length `seq_len`, an
    upper bound that never changes, rather than the longest segment (a new value for every batch, each a guard
    failure, and a device-to-host sync to read it). On the H100 length-mix run the exact maximum cost two
    recompilations inside the timed epoch; the bound only launches thread blocks past a segment's end, which exit
    at once."""
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    enable_gqa = varlen_takes_enable_gqa()
    if document_ids is None:
        return VarlenMask(cu_seqlens=None, max_len=seq_len, window=window, enable_gqa=enable_gqa)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    total = torch.tensor([document_ids.numel()], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, total]).to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    return VarlenMask(cu_seqlens=cu_seqlens, max_len=seq_len, window=window, enable_gqa=enable_gqa)


@functools.cache
def varlen_takes_enable_gqa() -> bool:
    """Whether `varlen_attn` has the enable_gqa parameter (torch >= 2.13, which refuses unequal head counts without
    it); torch 2.11 has none, and its kernel takes grouped heads as they are (same output, 1.61 vs 1.70 ms
    forward+backward at 8,192 tokens with 32/8 heads on an H100, benchmarks/results/varlen_gqa_h100.md). Asked
    when a mask is built, outside the compiled blocks, not at import: importing the varlen module imports dynamo."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: VarlenMask) -> torch.Tensor:
    """varlen_attn on q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D), segments from `mask`."""
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10; imported here so 2.9 can still use sdpa/flex

    B, H, T, D = q.shape
    # (B, H, T, D) -> (B, T, H, D): the projections made this layout contiguous, so flattening it costs nothing.
    # Under autocast, qk_norm returns fp32 q and k beside bf16 v; the kernel wants one dtype.
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k = q.to(v.dtype), k.to(v.dtype)
    # Grouped KV heads go in as they are: FlashAttention's kernel shares each among its query heads. Repeated
    # here, autograd would keep the repeated k and v for backward, 2 x (H - H_kv) x D more bytes a token per layer
    # (+0.75 GiB on the 1B shape at 8,192 tokens, train_speed_h100_varlen.md; 12 GiB at 131,072).
    q, k, v = q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
    cu_seqlens = mask.cu_seqlens
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    gqa = {"enable_gqa": True} if mask.enable_gqa and k.shape[1] != H else {}
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, mask.max_len, mask.max_len, window_size=mask.window, **gqa)
    return out.view(B, T, H, D).transpose(1, 2)


FLEX = AttentionBackend(name="flex", build_mask=flex_block_mask, attend=flex_attention_fn)
VARLEN = AttentionBackend(name="varlen", build_mask=varlen_mask, attend=varlen_attention)
BACKENDS = {"flex": FLEX, "varlen": VARLEN}
