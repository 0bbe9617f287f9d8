"""Choosing the next token: the one logits processor and sampler of every decoder in optrush (the KV-cache batched
decoder `optrush.generate.decode`, GRPO's rollouts, and the no-cache reference `generate` below).

    sampling = Sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    token = next_tokens(logits, seen, sampling, generator)        # logits (B, V), seen (B, V) bool -> (B,)
    ids = generate(model, [1, 450, 2], max_new_tokens=20, temperature=0)   # no cache: any model(input_ids) -> logits

Processing follows transformers' order: repetition penalty (https://arxiv.org/abs/1909.05858: positive logits of
already-seen tokens divided by it, negative ones multiplied), then temperature, top-k, top-p (nucleus sampling,
https://arxiv.org/abs/1904.09751: the smallest set of most likely tokens whose probability reaches top_p), min-p
(https://arxiv.org/abs/2407.01082: drop tokens less likely than min_p times the most likely one). temperature 0 is
greedy decoding (argmax after the penalty). Drawing happens on the CPU (one V-sized copy per step, negligible next
to the forward), so a seeded CPU `torch.Generator` reproduces the same tokens whichever device the model is on.

`generate` re-runs the whole sequence at every step: slow, but it works for any model with the forward signature
`model(input_ids) -> logits (B, T, V)`, and it is the reference the cached decoder is tested against.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True, slots=True)
class Sampling:
    temperature: float = 1.0
    """0 = greedy (argmax after the repetition penalty)."""
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    """1.0 = off; >1 discourages tokens that already occur in the prompt or the output."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: use 0 (greedy) or a positive value")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: use a positive number of tokens, or None for no cut")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: use a probability in (0, 1], or None for no cut")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}: use a value in [0, 1], or None for no cut")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: use a positive value (1.0 = off)")


def penalise_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """fp32 logits with the repetition penalty applied to the `seen` (B, V) tokens."""
    logits = logits.float()
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def raise_if_broken(broken: torch.Tensor) -> None:
    """Stop decoding when any row's (B,) `broken` flag is set: its logits leave no token to pick."""
    if broken.any():
        rows = broken.nonzero().flatten().tolist()
        raise FloatingPointError(f"the model's next-token logits are NaN or infinite (batch rows {rows}), so no "
                                 "token can be picked: the weights have diverged or overflowed (check the run's "
                                 "loss and grad_norm, or load the model in float32)")


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                *, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V), on `seen`'s device. `seen` (B, V) bool marks the tokens the
    repetition penalty hits; `allowed` (B, V) bool, when given, restricts the choice to its True tokens (token
    healing constrains the first new token this way)."""
    logits = penalise_repetition(logits, seen, sampling.repetition_penalty)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if sampling.temperature == 0:
        choice = logits.argmax(dim=-1)
        # argmax picks a NaN, and index 0 of an all -inf row: either would decode garbage without a word
        raise_if_broken(~logits.gather(-1, choice[:, None]).squeeze(-1).isfinite())
        return choice
    logits = logits.cpu() / sampling.temperature
    if sampling.top_k is not None:
        kth_largest = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # NaN or +inf logits, or every token masked out; multinomial's own error would name neither rows nor cause
    raise_if_broken(probs.isnan().any(dim=-1))
    if sampling.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely tokens before it already hold top_p of the mass; the first is kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(mass_before >= sampling.top_p, 0))
    if sampling.min_p is not None:
        probs = probs.masked_fill(probs < sampling.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(seen.device)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor | Sequence[int], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0,
             eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Up to `max_new_tokens` new token ids continuing `input_ids` ((1, T) tensor or a list), without a cache;
    stops after the first token in `eos_id` (which is included in the result). The model is in eval mode
    meanwhile."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}; give one non-empty prompt, (1, T) or a list")
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)

    was_training = model.training
    model.eval()
    try:
        new_tokens: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(ids)[:, -1, :]
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
            token = next_tokens(logits, seen, sampling, generator)
            new_tokens.append(int(token[0]))
            if new_tokens[-1] in stop:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
        return new_tokens
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The decoded continuation of `prompt` (special tokens skipped). `tokenizer` is a transformers tokenizer;
    `kwargs` go to `generate`, with `eos_id` defaulting to the tokenizer's EOS token."""
    kwargs.setdefault("eos_id", tokenizer.eos_token_id)
    new_tokens = generate(model, tokenizer.encode(prompt), **kwargs)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
