"""Batched decoding with a static KV cache: greedy or sampled (temperature, top-k, top-p, min-p, repetition
penalty), stopping at EOS or a stop string, streaming each token as it is chosen.

    texts = generate_texts(model, tokenizer, ["Pancakes", "A salad of"], max_new_tokens=200, temperature=0.7,
                           top_p=0.9, stop=["\\n\\n"], on_text=lambda row, piece: print(piece, end=""))
    rows = generate_batch(model, [[1, 450], [1, 9, 8, 7]], max_new_tokens=20, temperature=0)   # new ids per row

`model` is an optrush Transformer (optrush.models.llama). Prompts of different lengths are left-padded into one
batch: every row's position ids start at 0 at its first real token, and padding slots are masked out of the cache
(optrush.models.kv_cache), so each row decodes exactly as it would alone. After the prefill every step feeds one
token per row with the same shapes, so the step can be compiled (`step_fn=torch.compile(model)`). Finished rows keep
running (the batch shape is static) and their outputs are dropped; decoding ends when every row has finished.

Logits processing follows transformers' order: repetition penalty (https://arxiv.org/abs/1909.05858: positive
logits of already-seen tokens divided by it, negative ones multiplied), then temperature, top-k, top-p, min-p
(https://arxiv.org/abs/2407.01082: drop tokens less likely than min_p times the most likely one). Drawing uses a
seeded CPU generator when given, as in optrush.generate.sample.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from optrush.models.kv_cache import KVCache


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


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` (B, V); `seen` (B, V) bool marks the tokens the repetition penalty hits."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.cpu() / sampling.temperature
    if sampling.top_k is not None:
        kth_largest = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely tokens before it already hold top_p of the mass; the first is kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(mass_before >= sampling.top_p, 0))
    if sampling.min_p is not None:
        probs = probs.masked_fill(probs < sampling.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(seen.device)


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P) left-padded with pad_id, pad counts (B,)) for prompts of up to P tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in prompts])
    return ids.to(device), pads.to(device)


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float = 1.0,
                   eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                   should_stop: Callable[[int, list[int]], bool] | None = None,
                   on_token: Callable[[int, int], None] | None = None,
                   generator: torch.Generator | None = None,
                   step_fn: Callable[..., torch.Tensor] | None = None) -> list[list[int]]:
    """The new token ids of every prompt (EOS included when reached). `should_stop(row, new_ids)` ends a row
    early (stop strings); `on_token(row, token)` streams each token as soon as it is chosen; `step_fn` replaces
    `model` for the one-token steps (e.g. `torch.compile(model)`). The model is in eval mode meanwhile."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least 1 new token")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each of at least one token")
    device = model.tok_embeddings.weight.device
    ids, pads = left_pad(prompts, pad_id=pad_id, device=device)
    B, P = ids.shape
    max_len = P + max_new_tokens
    check_fits(model, prompt_len=P, max_new_tokens=max_new_tokens)
    eos = eos_set(eos_id)
    cache = KVCache.for_model(model, batch_size=B, max_len=max_len)
    slots = torch.arange(max_len, device=device)
    cache.valid.copy_(slots[None, :] >= pads[:, None])
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)
    seen = torch.zeros(B, model.args.vocab_size, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        seen[row, torch.as_tensor(prompt, device=device)] = True
    step_fn = model if step_fn is None else step_fn

    was_training = model.training
    model.eval()
    try:
        logits = model(ids, position_ids=positions[:, :P], cache=cache, cache_position=slots[:P])[:, -1]
        outputs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            token = next_tokens(logits, seen, sampling, generator)
            # One device-to-host copy per step; a finished row's token is still fed back (static shapes), unused.
            for row, tok in enumerate(token.tolist()):
                if done[row]:
                    continue
                outputs[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
                done[row] = tok in eos or (should_stop is not None and should_stop(row, outputs[row]))
            if all(done) or step == max_new_tokens - 1:
                break
            seen.scatter_(1, token[:, None], True)
            slot = P + step
            # clones: fresh tensors (not views at moving offsets) keep a compiled step_fn from recompiling
            logits = step_fn(token[:, None], position_ids=positions[:, slot:slot + 1].clone(), cache=cache,
                             cache_position=slots[slot:slot + 1].clone())[:, -1]
        return outputs
    finally:
        model.train(was_training)


def stop_string_checker(tokenizer, stop: Sequence[str]) -> Callable[[int, list[int]], bool]:
    """A `should_stop` for generate_batch: True once a row's decoded output contains any of `stop`."""
    longest = max(len(s) for s in stop)

    def should_stop(row: int, new_ids: list[int]) -> bool:
        # A stop string spans at most `longest` tokens (each token decodes to at least one character)
        tail = tokenizer.decode(new_ids[-longest - 1:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return should_stop


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the first occurrence of any stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[str], *, stop: Sequence[str] = (),
                   on_text: Callable[[int, str], None] | None = None, **kwargs) -> list[str]:
    """The decoded continuation of every prompt (special tokens skipped, cut before a stop string).
    `on_text(row, piece)` streams the text as it grows; `kwargs` go to generate_batch, with `eos_id` defaulting
    to the tokenizer's EOS token and `pad_id` to its pad token."""
    kwargs.setdefault("eos_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    streamed = [""] * len(prompts)
    rows: list[list[int]] = [[] for _ in prompts]

    def emit(row: int, text: str) -> None:
        if text.startswith(streamed[row]) and len(text) > len(streamed[row]):
            piece, streamed[row] = text[len(streamed[row]):], text
            if on_text is not None:
                on_text(row, piece)

    def on_token(row: int, token: int) -> None:
        rows[row].append(token)
        text = cut_at_stop(tokenizer.decode(rows[row], skip_special_tokens=True), stop)
        # Stream only text that is final: an incomplete UTF-8 sequence decodes to U+FFFD until its last byte
        # comes, and a tail that may begin a stop string waits until it is known not to.
        if not text.endswith("\ufffd"):
            emit(row, text[:len(text) - _stop_prefix_length(text, stop)])

    new_ids = generate_batch(model, [tokenizer.encode(p) for p in prompts],
                             should_stop=stop_string_checker(tokenizer, stop) if stop else None,
                             on_token=on_token, **kwargs)
    texts = [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop) for ids in new_ids]
    for row, text in enumerate(texts):
        emit(row, text)
    return texts


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def check_fits(model: nn.Module, *, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"the longest prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                         f"the model's max_seq_len={model.args.max_seq_len}: shorten the prompt or ask for fewer "
                         "tokens")


def eos_set(eos_id: int | Sequence[int] | None) -> set[int]:
    return set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
