"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` without ever holding the (tokens x vocab) logits.

    loss = fused_linear_cross_entropy(hidden, model.output.weight, labels, reduction="sum", chunk_tokens=4096)
    model.loss_fn = functools.partial(fused_linear_cross_entropy, chunk_tokens=4096, z_loss=1e-4)

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from optrush.data.batch import IGNORE_INDEX


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
    loss = _FusedLinearCrossEntropy.apply(hidden_2d, weight, labels_1d, chunk_tokens, z_loss,
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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed loss over (N, D) rows; forward also computes both gradients, backward scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                z_loss: float, need_hidden_grad: bool, need_weight_grad: bool) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        # fp32 accumulator: summing many bf16 chunk products in bf16 would lose the small ones
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start:start + chunk_tokens]
            chunk = _chunk_compiled if hidden.is_cuda else _chunk
            chunk_loss, grad_logits = chunk(rows, weight, labels[start:start + chunk_tokens], z_loss=z_loss,
                                            need_grad=need_hidden_grad or need_weight_grad)
            loss = loss + chunk_loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.t() @ rows)  # promotes in the kernel: no fp32 copy of the product
        # Keep it in the parameter's dtype (what autograd would hand over anyway): with bf16 weights this halves
        # what stays allocated through the model's backward pass.
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, z_loss: float,
           need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss of these rows, d loss / d logits in the working dtype or None)."""
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
    loss = torch.where(trained, per_token, 0.0).sum()
    if not need_grad:
        return loss, None
    # d/dlogits of (lse - logit[y] + z * lse^2) = softmax * (1 + 2 z lse) - onehot(y), built in the same buffer
    grad = exp.mul_(((1 + 2 * z_loss * lse) / total)[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(target_logit[:, None], -1.0))
    grad.mul_(trained[:, None])
    return loss, grad.to(work_dtype)


# One fused kernel for the element-wise work over each (chunk x vocab) block instead of about ten passes over it
# in eager mode. Measured at 8192 tokens x vocab 128256, bf16, chunks of 4096, on an H100: 42.9 ms with the chunk
# eager, 27.4 ms with it compiled, 23.0 ms with the whole loss compiled (naive: 33.6 ms). Only the chunk is
# compiled, so any number of rows runs with at most two shapes (full chunks and the last one), and a compiled
# model inlines it. On CPU the eager function runs (Inductor's CPU build costs seconds and buys nothing in tests).
_chunk_compiled = torch.compile(_chunk, fullgraph=True)
