"""Text generation by sampling from a causal LM, one token at a time, with no KV cache: every step re-runs the
whole sequence. The reference for any model with the forward signature (fine for smoke tests and demos); the fast
batched path for optrush models is optrush.generate.decode.

    text = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95)
    ids = generate(model, [1, 450, 2], max_new_tokens=20, temperature=0)   # greedy, new tokens only

`model(input_ids)` must return logits (B, T, V). temperature 0 is greedy decoding; otherwise logits are divided
by the temperature, cut to the `top_k` most likely tokens and/or the smallest set whose probability reaches
`top_p` (nucleus sampling, https://arxiv.org/abs/1904.09751), and a token is drawn. Drawing happens on the CPU
(one V-sized copy per token, negligible next to the forward), so a seeded CPU `torch.Generator` reproduces the
same tokens whichever device the model is on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One next token per row of `logits` (B, V) -> (B,) int64 on the CPU."""
    if temperature == 0:
        return logits.argmax(dim=-1).cpu()
    logits = logits.float().cpu() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely tokens before it already hold top_p of the mass; the first is kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor | Sequence[int], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Up to `max_new_tokens` new token ids continuing `input_ids` ((1, T) tensor or a list); stops after the
    first token in `eos_id` (which is included in the result). The model is in eval mode meanwhile."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: use 0 (greedy) or a positive value")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: use a positive number of tokens, or None for no cut")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: use a probability in (0, 1], or None for no cut")
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
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            new_tokens.append(int(token[0]))
            if new_tokens[-1] in stop:
                break
            ids = torch.cat([ids, token.to(device).view(1, 1)], dim=1)
        return new_tokens
    finally:
        model.train(was_training)


def generate_text(model: nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The decoded continuation of `prompt` (special tokens skipped). `tokenizer` is a transformers tokenizer;
    `kwargs` go to `generate`, with `eos_id` defaulting to the tokenizer's EOS token."""
    kwargs.setdefault("eos_id", tokenizer.eos_token_id)
    new_tokens = generate(model, tokenizer.encode(prompt), **kwargs)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
