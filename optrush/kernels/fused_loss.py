"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` without ever holding the (tokens x vocab) logits.

    loss = fused_linear_cross_entropy(hidden, model.output.weight, labels, reduction="sum", chunk_tokens=4096)
    model.loss_fn = functools.partial(fused_linear_cross_entropy, chunk_tokens=4096, z_loss=1e-4)
    logps = chunked_label_logps(hidden, model.output.weight, labels, chunk_tokens=4096)   # per token, for DPO/GRPO

For a Llama-3 vocabulary (128,256) the full fp32 logits of 8,192 tokens take 4 GiB, and a naive forward+backward
holds several copies of them (12.85 GiB measured on an H100, /work/shared/gpu/NOTES.md). Here the rows are processed
in chunks of `chunk_tokens`: each chunk's logits, log-sum-exp, loss and gradients (with respect to `hidden` and
`weight`) are computed in the *forward* pass and the logits are dropped at once; only the gradients are kept, and
backward merely scales them by the incoming gradient. Peak extra memory is a few chunk-sized (chunk x vocab)
buffers plus one fp32 copy of `weight`'s gradient. The same idea as Liger's fused linear cross-entropy
(https://arxiv.org/abs/2410.10989), written in plain PyTorch ops so that torch.compile can trace and fuse it.

Semantics match `optrush.models.layers.linear_cross_entropy` (aligned labels, IGNORE_INDEX rows skipped, the
logits matmul in the working dtype, softmax and loss in fp32), plus an optional z-loss
`z_loss * logsumexp(logits)**2` per trained token (PaLM, https://arxiv.org/abs/2204.02311), added to the loss.

`chunked_label_logps` returns every token's log p(label) instead of a sum (what preference and RL objectives
read). Its incoming gradient differs per token and is unknown in the forward pass, so it cannot precompute the
gradients; it keeps nothing chunk-sized either, and backward recomputes each chunk's logits (one extra head matmul
per chunk). Both functions run the same chunked core, `_chunked`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from optrush.data.batch import IGNORE_INDEX
from optrush.kernels.lazy_compile import compile_on_first_call, never_traced


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               reduction: str = "mean", chunk_tokens: int = 4096,
                               z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy (+ z-loss) of `hidden` (..., D) projected by `weight` (V, D) against `labels` (...).

    "sum" adds the per-token losses; "mean" divides by the trained-token count (NaN when there are none).
    Gradients are computed during the forward pass only when autograd will ask for them.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1 (kernels.loss_chunk_tokens)")
    hidden_2d, labels_1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    grad_enabled = torch.is_grad_enabled()
    need_hidden_grad = grad_enabled and hidden.requires_grad
    need_weight_grad = grad_enabled and weight.requires_grad
    loss = traced_or_not(_FusedLinearCrossEntropy, hidden_2d, weight, labels_1d, chunk_tokens, z_loss,
                         need_hidden_grad, need_weight_grad)
    if reduction == "mean":
        loss = loss / (labels_1d != IGNORE_INDEX).sum()
    return loss


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """The plain path with the same signature: full fp32 logits, `layers.linear_cross_entropy` plus the z-loss."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logits = F.linear(hidden, weight).float().flatten(0, -2)
    labels = labels.flatten()
    trained = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss:
        loss = loss + z_loss * torch.where(trained, torch.logsumexp(logits, dim=-1).square(), 0.0).sum()
    return loss / trained.sum() if reduction == "mean" else loss


def chunked_label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        chunk_tokens: int = 4096) -> torch.Tensor:
    """fp32 log-probability of each label (...) under the softmax of `hidden` (..., D) projected by `weight`
    (V, D); 0 where the label is IGNORE_INDEX. At most a few (chunk x vocab) blocks live at a time, forward and
    backward; backward recomputes each chunk's logits, as the incoming gradient differs per token."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1 (kernels.loss_chunk_tokens)")
    logps = traced_or_not(_ChunkedLabelLogps, hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                          chunk_tokens)
    return logps.view(labels.shape)


def reference_label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path with the same signature: full fp32 logits and log-softmax."""
    logps = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    logps = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, logps, 0.0)


TRACED_CHUNKS = 2
"""Under whole-model compile (compile.mode=model) a loss of at most this many chunks is traced into the model's
graph, where Inductor fuses it with the model's tail (the fastest 1B step, 8,192 tokens in two chunks). A longer
one runs outside that graph, one compiled chunk after another: traced, its unrolled loop is reordered and every
chunk's buffers are live at once (65,536 tokens on the 1B shape: 16 (vocab x dim) weight-gradient products and 8
chunks' logit gradients at the peak, 73 GiB where 29 were planned; benchmarks/results/memory_peak.md)."""


def traced_or_not(function: type[torch.autograd.Function], hidden: torch.Tensor, weight: torch.Tensor,
                  labels: torch.Tensor, chunk_tokens: int, *rest):
    """`function.apply(hidden, weight, labels, chunk_tokens, *rest)`, outside any enclosing torch.compile graph
    when it takes more than TRACED_CHUNKS chunks."""
    args = (hidden, weight, labels, chunk_tokens, *rest)
    chunks = -(-hidden.shape[0] // chunk_tokens)
    return function.apply(*args) if chunks <= TRACED_CHUNKS else _untraced_apply(function, *args)


@never_traced
def _untraced_apply(function: type[torch.autograd.Function], *args):
    return function.apply(*args)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed loss over (N, D) rows; forward also computes both gradients, backward scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                z_loss: float, need_hidden_grad: bool, need_weight_grad: bool) -> torch.Tensor:
        need_grad = need_hidden_grad or need_weight_grad
        ones = torch.ones(hidden.shape[0], device=hidden.device) if need_grad else None
        losses, grad_hidden, grad_weight = _chunked(hidden, weight, labels, chunk_tokens=chunk_tokens,
                                                    z_loss=z_loss, grad_scale=ones,
                                                    need_hidden_grad=need_hidden_grad,
                                                    need_weight_grad=need_weight_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class _ChunkedLabelLogps(torch.autograd.Function):
    """(N,) label log-probs of (N, D) rows; backward recomputes each chunk's logits, under the autocast state
    of the forward pass (autograd runs backward outside any autocast region)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        losses, _, _ = _chunked(hidden, weight, labels, chunk_tokens=chunk_tokens, z_loss=0.0, grad_scale=None,
                                need_hidden_grad=False, need_weight_grad=False)
        ctx.save_for_backward(hidden, weight, labels)
        device = hidden.device.type
        ctx.chunk_tokens, ctx.device = chunk_tokens, device
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        return -losses

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
            _, grad_hidden, grad_weight = _chunked(hidden, weight, labels, chunk_tokens=ctx.chunk_tokens,
                                                   z_loss=0.0, grad_scale=-grad_logps.float(),
                                                   need_hidden_grad=ctx.needs_input_grad[0],
                                                   need_weight_grad=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int,
             z_loss: float, grad_scale: torch.Tensor | None, need_hidden_grad: bool, need_weight_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The core both losses share: (N,) fp32 per-token losses (0 where untrained) of (N, D) rows, and, where
    asked, the gradients of sum(grad_scale * losses) with respect to `hidden` and `weight` (in their dtypes)."""
    losses = []
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    # fp32 accumulator: summing many bf16 chunk products in bf16 would lose the small ones
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if need_weight_grad else None
    chunk = _chunk_compiled if hidden.is_cuda else _chunk
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        rows = hidden[start:end]
        scale = grad_scale[start:end] if need_hidden_grad or need_weight_grad else None
        chunk_losses, grad_logits = chunk(rows, weight, labels[start:end], z_loss=z_loss, grad_scale=scale)
        # appended, not written into a preallocated (N,) buffer: under whole-model compile that slice write kept
        # each chunk's fp32 logits copy alive (+1.45 GiB at the Llama-3.2-1B shape, B=4 x 2048, H100)
        losses.append(chunk_losses)
        if grad_hidden is not None:
            grad_hidden[start:end] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight.add_(grad_logits.t() @ rows)  # promotes in the kernel: no fp32 copy of the product
        # released before the next chunk is computed, not when the name is rebound after it (measured on an
        # H100 before this line: 6.31 bytes per chunk element instead of the 4.17 of a whole-compiled loss)
        del grad_logits
    # Keep it in the parameter's dtype (what autograd would hand over anyway): with bf16 weights this halves
    # what stays allocated through the model's backward pass.
    return torch.cat(losses), grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, z_loss: float,
           grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token losses of these rows, 0 where untrained; d sum(grad_scale * losses) / d logits in the working
    dtype, or None when `grad_scale` is None)."""
    logits = F.linear(hidden, weight)
    work_dtype = logits.dtype  # the weights' dtype, or bf16 under autocast
    logits = logits.float()
    trained = labels != IGNORE_INDEX
    targets = torch.where(trained, labels, 0)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    # log-sum-exp by hand, in place: torch.logsumexp would allocate a second (chunk x vocab) fp32 buffer
    top = logits.amax(dim=-1)
    exp = logits.sub_(top[:, None]).exp_()
    total = exp.sum(dim=-1)
    lse = top + total.log()
    per_token = lse - target_logit
    if z_loss:
        per_token = per_token + z_loss * lse.square()
    losses = torch.where(trained, per_token, 0.0)
    if grad_scale is None:
        return losses, None
    # d/dlogits of (lse - logit[y] + z * lse^2) = softmax * (1 + 2 z lse) - onehot(y), built in the same buffer
    grad = exp.mul_(((1 + 2 * z_loss * lse) / total)[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(target_logit[:, None], -1.0))
    grad.mul_(torch.where(trained, grad_scale, 0.0)[:, None])
    return losses, grad.to(work_dtype)


def _chunk_for_compiler(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, z_loss: float,
                        grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk`'s math written for Inductor: no in-place ops and no fp32 (chunk x vocab) value read twice, so the
    compiled graph reads the working-dtype logits in a log-sum-exp reduction and again in one pointwise kernel
    that writes the gradient, and never materializes fp32 logits (`_chunk` compiled keeps one: 4 bytes per
    chunk x vocab element written and read again; 2 GiB at 4096 x 128,256). Eager, it would allocate several fp32
    blocks, which is why the eager path keeps `_chunk`."""
    logits = F.linear(hidden, weight)
    work_dtype = logits.dtype
    x = logits.float()
    trained = labels != IGNORE_INDEX
    targets = torch.where(trained, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    per_token = lse - x.gather(1, targets[:, None]).squeeze(1)
    if z_loss:
        per_token = per_token + z_loss * lse.square()
    losses = torch.where(trained, per_token, 0.0)
    if grad_scale is None:
        return losses, None
    scale = torch.where(trained, grad_scale, 0.0)
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = torch.exp(x - lse[:, None]) * ((1 + 2 * z_loss * lse) * scale)[:, None] \
        - torch.where(is_target, scale[:, None], 0.0)
    return losses, grad.to(work_dtype)


# One fused kernel for the element-wise work over each (chunk x vocab) block instead of about ten passes over it
# in eager mode. Measured at 8192 tokens x vocab 128256, bf16, chunks of 4096, on an H100: 42.9 ms with the chunk
# eager, 27.4 ms with it compiled, 23.0 ms with the whole loss compiled (naive: 33.6 ms) (`_chunk` compiled, before
# `_chunk_for_compiler`). Only the chunk is compiled, so any number of rows runs with at most two shapes (full
# chunks and the last one), and a compiled model inlines it. On CPU the eager `_chunk` runs (Inductor's CPU build
# costs seconds and buys nothing in tests).
_chunk_compiled = compile_on_first_call(_chunk_for_compiler, fullgraph=True)
