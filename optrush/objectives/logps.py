"""Per-token log-probs of the labels under a causal LM: what the preference and RL objectives (DPO, GRPO) read.

    logps = label_logps(model, input_ids, labels, chunk_tokens=None)   # (B, T) fp32, 0 where IGNORE_INDEX
    with chunked_logps_head(model, chunk_tokens=4096):                 # any forward of `model` given labels
        logps = model(input_ids, position_ids=..., labels=labels)

`chunk_tokens=None` projects the full (B, T, vocab) logits and takes an fp32 log-softmax. An int
(`kernels.loss_chunk_tokens`, when `kernels.fused_loss=true`: that switch means "never materialise the full
logits") routes the model's output head through `optrush.kernels.fused_loss.chunked_label_logps` for the forward
passes inside the block: the model hands its final hidden states and `output.weight` to `model.loss_fn` when given
labels, and the block swaps that attribute for one returning every token's log-prob (the same kind of swap as
the shared-prompt attention backend in optrush.objectives.dpo). With the 1B shape's 128,256-token vocabulary the
full fp32 logits of 8 pairs x 2 sequences x 1,024 tokens take 7.8 GiB, and their log-softmax and its gradient as
much again each; the chunked head holds a few (chunk x vocab) blocks.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from optrush.data.batch import IGNORE_INDEX
from optrush.kernels.fused_loss import chunked_label_logps


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 log-prob of each target token; 0 where the label is IGNORE_INDEX."""
    trained = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * trained


@functools.cache
def logps_head(chunk_tokens: int) -> Callable[..., torch.Tensor]:
    """A `model.loss_fn` that returns each label's log-prob instead of a loss. One function per chunk size, so
    that a compiled model's guard on `loss_fn` holds from one call to the next."""
    def head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, reduction: str) -> torch.Tensor:
        return chunked_label_logps(hidden, weight, labels, chunk_tokens=chunk_tokens)  # per token: no reduction

    return head


@contextmanager
def chunked_logps_head(model: nn.Module, *, chunk_tokens: int) -> Iterator[None]:
    """Inside the block, `model(..., labels=labels)` returns each label's log-prob (B, T), computed chunk by
    chunk of `chunk_tokens` tokens, instead of the loss."""
    loss_fn = model.loss_fn
    model.loss_fn = logps_head(chunk_tokens)
    try:
        yield
    finally:
        model.loss_fn = loss_fn


def label_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int | None,
                **forward) -> torch.Tensor:
    """(B, T) fp32 log-prob of each label under `model` (0 where IGNORE_INDEX), from the full logits
    (`chunk_tokens=None`) or chunk by chunk; `forward`: the model's other keyword arguments."""
    if chunk_tokens is None:
        return token_logps(model(input_ids, **forward), labels)
    with chunked_logps_head(model, chunk_tokens=chunk_tokens):
        return model(input_ids, labels=labels, **forward)
