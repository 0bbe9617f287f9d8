"""Long context: context parallelism (ring attention over a process group) and context extension (RoPE scaling).

    model = apply_context_extension(model, cfg)                # model.rope_scaling / model.max_seq_len, at build
    model, shard = setup_context_parallel(model, cfg, pad_id=0)  # cfg.context: degree, layout; this rank's group
    loss_sum, _ = objective(model, shard(batch).to(device))     # this rank's tokens only; see "Training" below
    # the parts: apply_context_parallel(model, cfg, group) and shard_batch(batch, rank=, world=, layout=)

Ring attention (https://arxiv.org/abs/2310.01889): the queries stay where they are; the keys and values travel
around the ring, one hop per step, so after `world` steps every query block has met every key block. Each step's
partial attention comes with its log-sum-exp, and the partial results merge exactly by online softmax (as in
FlashAttention). Backward runs the same ring again (`_RingAttention`, a custom autograd Function): the key/value
gradients travel with their blocks and arrive home after the last hop. No rank ever holds more than two key/value
blocks, so attention memory is that of a sequence `world` times shorter; the other layers are per-token anyway.

Layouts (`context.layout`): the sequence is cut into equal chunks. `contiguous` gives rank r chunk r, so under the
causal mask the last rank does `world` times the work of the first. `zigzag` cuts 2 x world chunks and gives rank r
chunks r and 2 x world - 1 - r, which balances the causal work exactly. Every (query chunk, key chunk) pair is then
either fully visible (key chunk earlier), causal on the diagonal (same chunk) or skipped (key chunk later), so each
block runs a plain dense or causal attention kernel: FlashAttention's forward/backward ops on CUDA in bf16/fp16
(which return the log-sum-exp), the reference formula in fp32 elsewhere (CPU tests).

Training: each rank's loss covers its own tokens, so (a) the step's trained-token count and the summed loss must be
all-reduced over the group, and (b) the parameter gradients summed over it (FSDP2 does (b) when its mesh includes
the context dimension, as torchtitan's dp_shard_cp). Position ids are sliced from the full row, so RoPE sees
global positions. Causal whole rows only: packed batches (document masks) and sliding windows are refused.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from optrush.config import Config, ConfigError
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.models.layers import AttentionBackend
from optrush.models.llama import Transformer

LAYOUTS = ("zigzag", "contiguous")


def apply_context_parallel(model: nn.Module, cfg: Config, group: dist.ProcessGroup) -> nn.Module:
    """Make every attention layer of `model` ring attention over `group` (its size must be context.degree)."""
    if group.size() != cfg.context.degree:
        raise ValueError(f"context.degree={cfg.context.degree} but the process group has {group.size()} ranks")
    if model.args.sliding_window is not None:
        raise ValueError("context parallelism needs full causal attention, but the model has sliding_window="
                         f"{model.args.sliding_window}; set context.degree=1")
    attend = functools.partial(ring_attention, group=group, layout=cfg.context.layout)
    model.set_attention_backend(AttentionBackend(name=f"ring-{cfg.context.layout}", build_mask=causal_rows_only,
                                                 attend=attend))
    return model


def context_group(degree: int) -> dist.ProcessGroup | None:
    """This rank's context-parallel group, `degree` consecutive ranks (None for degree 1). Collective: every rank
    creates every group, as torch.distributed.new_group requires. Gradients are reduced by the data-parallel
    strategy over all ranks, so the cp ranks of a row sum their parts of its gradient there."""
    if degree == 1:
        return None
    world = dist.get_world_size()
    if world % degree:
        raise ConfigError(f"context.degree={degree} must divide the number of processes ({world}): launch a "
                          f"multiple of {degree} processes")
    groups = [dist.new_group(list(range(start, start + degree))) for start in range(0, world, degree)]
    return groups[dist.get_rank() // degree]


def data_parallel_position(degree: int) -> tuple[int, int]:
    """(rank, world size) of this process's data-parallel replica: the ranks of one context group read the same
    rows, so the loader shards over world / degree replicas."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank // degree, world // degree


def setup_context_parallel(model: nn.Module, cfg: Config, *, pad_id: int) -> tuple[nn.Module, Callable[[Batch], Batch]]:
    """Ring attention on `model` over this rank's context group (collective: every rank calls it), and the map of a
    batch to this rank's part of its sequence dimension; without context parallelism the model as it is and the
    identity. The training loop and `optrush bench` both start from it."""
    group = context_group(cfg.context.degree)
    if group is None:
        return model, lambda batch: batch
    shard = functools.partial(shard_batch, rank=group.rank(), world=group.size(), layout=cfg.context.layout,
                              pad_id=pad_id)
    return apply_context_parallel(model, cfg, group), shard


def causal_rows_only(document_ids: torch.Tensor | None, *, seq_len: int, sliding_window: int | None = None,
                     device: torch.device | str | None = None) -> None:
    """The ring backend's mask builder: there is no mask, each row is one causal sequence."""
    if document_ids is not None:
        raise ValueError("context parallelism attends causally over whole rows; packed batches (document_ids) are "
                         "not supported: set data.packing to none or sorted")
    return None


def apply_context_extension(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply `model.rope_scaling` / `model.max_seq_len` (context extension while fine-tuning) to a freshly built or
    loaded model, before anything copies it (a DPO reference model must see the same RoPE); returns it."""
    m = cfg.model
    if m.rope_scaling is None and not m.max_seq_len:
        return model
    if not isinstance(model, Transformer):
        raise ValueError(f"model.rope_scaling/model.max_seq_len need the native Llama-family model, but "
                         f"{type(model).__name__} was loaded through transformers; leave them unset")
    model.set_rope(scaling=model.args.rope_scaling if m.rope_scaling is None else m.rope_scaling,
                   max_seq_len=m.max_seq_len or model.args.max_seq_len)
    return model


# ------------------------------------------------------------------------------------------------- sharding

def chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Indices of the sequence chunks rank `rank` holds, in order (`world` chunks, or 2 x world for zigzag)."""
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    raise ValueError(f"context.layout={layout!r}: expected one of {', '.join(LAYOUTS)}")


def shard_batch(batch: Batch, *, rank: int, world: int, layout: str, pad_id: int = 0) -> Batch:
    """This rank's part of every row of `batch` (sequence dimension), right-padded first to a multiple of the
    chunk count with untrained tokens (pad_id, IGNORE_INDEX labels), which causal attention keeps out of every
    real token's view."""
    if batch.document_ids is not None:
        causal_rows_only(batch.document_ids, seq_len=batch.input_ids.shape[1])
    pieces = world * (2 if layout == "zigzag" else 1)
    rows, length = batch.input_ids.shape
    padded = -(-length // pieces) * pieces
    pad = padded - length
    input_ids, labels, positions = batch.input_ids, batch.labels, batch.position_ids
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_full((rows, pad), pad_id)], dim=1)
        labels = torch.cat([labels, labels.new_full((rows, pad), IGNORE_INDEX)], dim=1)
        tail = positions[:, -1:] + torch.arange(1, pad + 1, device=positions.device)
        positions = torch.cat([positions, tail], dim=1)
    size = padded // pieces
    ids = chunk_ids(rank, world, layout)

    def take(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, i * size:(i + 1) * size] for i in ids], dim=1)

    lengths = batch.attention_lengths if batch.attention_lengths is not None else torch.full((rows,), length)
    local_lengths = sum((lengths - i * size).clamp(0, size) for i in ids)
    return Batch(input_ids=take(input_ids), labels=take(labels), position_ids=take(positions),
                 attention_lengths=local_lengths)


# ---------------------------------------------------------------------------------------------- ring attention

def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: None, group: dist.ProcessGroup,
                   layout: str) -> torch.Tensor:
    """Causal attention of the local queries over the whole sequence held by `group`: q (B, H, T_local, D),
    k and v (B, H_kv, T_local, D) laid out by `chunk_ids`; returns (B, H, T_local, D)."""
    if mask is not None:
        raise ValueError("ring attention takes no mask (causal whole rows only)")
    return _RingAttention.apply(q, k, v, group, layout)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, layout):
        world, rank = group.size(), group.rank()
        scale = q.shape[-1] ** -0.5
        mine = chunk_ids(rank, world, layout)
        size = q.shape[2] // len(mine)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        aux = None
        for step in range(world):
            incoming = ring_shift(kv, group) if step < world - 1 else None
            for qi, kj, causal in block_pairs(mine, chunk_ids((rank - step) % world, world, layout)):
                rows = slice(qi * size, (qi + 1) * size)
                block_out, block_lse, aux = block_forward(q[:, :, rows], *(t[:, :, kj * size:(kj + 1) * size]
                                                                           for t in kv), causal=causal, scale=scale)
                merged = torch.logaddexp(lse[:, :, rows], block_lse)
                # in place: at 64k-token chunks each (B, H, chunk, D) fp32 temporary is a GiB
                acc = out[:, :, rows]
                acc.mul_((lse[:, :, rows] - merged).exp().unsqueeze(-1))
                acc.add_(block_out * (block_lse - merged).exp().unsqueeze(-1))
                lse[:, :, rows] = merged
            if incoming is not None:
                kv = incoming.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.scale, ctx.aux = group, layout, scale, aux
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale = ctx.group, ctx.layout, ctx.scale
        world, rank = group.size(), group.rank()
        mine = chunk_ids(rank, world, layout)
        size = q.shape[2] // len(mine)
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        # the gradients of the key/value block currently held, travelling with it around the ring
        dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
               torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        for step in range(world):
            incoming = ring_shift(kv, group) if step < world - 1 else None
            for qi, kj, causal in block_pairs(mine, chunk_ids((rank - step) % world, world, layout)):
                rows, cols = slice(qi * size, (qi + 1) * size), slice(kj * size, (kj + 1) * size)
                grads = block_backward(grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                       out[:, :, rows], lse[:, :, rows], causal=causal, scale=scale, aux=ctx.aux)
                dq[:, :, rows] += grads[0]
                dkv[0][:, :, cols] += grads[1]
                dkv[1][:, :, cols] += grads[2]
            dkv = ring_shift(dkv, group).wait()  # after the last hop each block's gradients are back home
            if incoming is not None:
                kv = incoming.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def block_pairs(query_chunks: list[int], key_chunks: list[int]) -> list[tuple[int, int, bool]]:
    """(local query chunk, local key chunk, causal) for every pair the causal mask does not hide entirely."""
    return [(qi, kj, kc == qc) for qi, qc in enumerate(query_chunks) for kj, kc in enumerate(key_chunks)
            if kc <= qc]


class _Shift:
    """Tensors in flight from the previous rank of the ring; `wait()` returns them."""

    def __init__(self, works: list, received: list[torch.Tensor]):
        self.works, self.received = works, received

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


def ring_shift(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> _Shift:
    """Send `tensors` to the next rank of `group` and receive the previous rank's, asynchronously."""
    world, rank = group.size(), group.rank()
    following = dist.get_global_rank(group, (rank + 1) % world)
    preceding = dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, following, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, preceding, group) for r in received]
    return _Shift(dist.batch_isend_irecv(ops), received)


# ------------------------------------------------------------------------------------------ one block of attention

def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float):
    """(output, log-sum-exp (B, H, Tq) fp32, kernel state for `block_backward`) of dense or causal attention."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if use_flash(q):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, *aux = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                            scale=scale)
        return out, lse, aux[:6]
    scores = reference_scores(q, k, causal=causal, scale=scale)
    lse = scores.logsumexp(-1)
    return ((scores - lse.unsqueeze(-1)).exp() @ v.float()).to(q.dtype), lse, None


def block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, causal: bool, scale: float, aux) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv) of one block, given the *merged* output and log-sum-exp of the whole ring: with
    those, softmax probabilities and the row term sum(dout * out) are the global ones, as the backward needs."""
    heads_kv = k.shape[1]
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if use_flash(q):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        grad_out, q, k, v, out, lse = (t.contiguous() for t in (grad_out, q, k, v, out, lse))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    else:
        probs = (reference_scores(q, k, causal=causal, scale=scale) - lse.unsqueeze(-1)).exp()
        dout = grad_out.float()
        dv = probs.transpose(-1, -2) @ dout
        row = (dout * out.float()).sum(-1, keepdim=True)
        dscores = probs * (dout @ v.float().transpose(-1, -2) - row) * scale
        dq, dk = dscores @ k.float(), dscores.transpose(-1, -2) @ q.float()
    return dq.float(), reduce_kv(dk.float(), heads_kv), reduce_kv(dv.float(), heads_kv)


def use_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def reference_scores(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def reduce_kv(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """The gradient of `expand_kv`: sum over the query heads that shared each key/value head."""
    if grad.shape[1] == heads_kv:
        return grad
    b, h, t, d = grad.shape
    return grad.view(b, heads_kv, h // heads_kv, t, d).sum(2)
