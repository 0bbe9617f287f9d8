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

The next token is chosen by `optrush.generate.sample.next_tokens` (repetition penalty, temperature, top-k, top-p,
min-p, in transformers' order; a seeded CPU generator reproduces the draws on any device).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from optrush.generate.healing import heal_prompts
from optrush.generate.sample import Sampling, next_tokens
from optrush.models.kv_cache import KVCache
from optrush.parallel.distributed import all_reduce_sum


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
                   step_fn: Callable[..., torch.Tensor] | None = None,
                   first_allowed: torch.Tensor | None = None, stop_together: bool = False) -> list[list[int]]:
    """The new token ids of every prompt (EOS included when reached). `should_stop(row, new_ids)` ends a row
    early (stop strings); `on_token(row, token)` streams each token as soon as it is chosen; `step_fn` replaces
    `model` for the one-token steps (e.g. `torch.compile(model)`); `first_allowed` (B, V) bool restricts each
    row's first new token (token healing, optrush.generate.healing). `stop_together`: under a process group,
    every rank runs as many decode steps as the slowest one (a rank whose rows are done keeps stepping, its outputs
    unchanged): with FSDP-sharded weights every forward is a collective, so ranks that stopped at different steps
    would hang. The model is in eval mode meanwhile."""
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
            token = next_tokens(logits, seen, sampling, generator, allowed=first_allowed if step == 0 else None)
            # One device-to-host copy per step; a finished row's token is still fed back (static shapes), unused.
            for row, tok in enumerate(token.tolist()):
                if done[row]:
                    continue
                outputs[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
                done[row] = tok in eos or (should_stop is not None and should_stop(row, outputs[row]))
            finished = all(done)
            if stop_together:  # one all-reduce per step: how many ranks still have rows running
                finished = all_reduce_sum([0.0 if finished else 1.0], device=device)[0] == 0
            if finished or step == max_new_tokens - 1:
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
                   on_text: Callable[[int, str], None] | None = None, token_healing: bool = False,
                   **kwargs) -> list[str]:
    """The decoded continuation of every prompt (special tokens skipped, cut before a stop string).
    `on_text(row, piece)` streams the text as it grows; `token_healing` backs off each prompt's last token and
    makes the first new token extend its text (optrush.generate.healing); `kwargs` go to generate_batch, with
    `eos_id` defaulting to the tokenizer's EOS token and `pad_id` to its pad token."""
    kwargs.setdefault("eos_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    # the text of each prompt that the output re-generates (token healing) and is not shown twice
    removed = [""] * len(prompts)
    if token_healing:
        prompt_ids, removed, kwargs["first_allowed"] = heal_prompts(
            tokenizer, prompt_ids, vocab_size=model.args.vocab_size, device=model.tok_embeddings.weight.device)
    streamed = [""] * len(prompts)
    rows: list[list[int]] = [[] for _ in prompts]

    def decode(row: int, ids: list[int]) -> str:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return cut_at_stop(text[len(removed[row]):] if text.startswith(removed[row]) else "", stop)

    def emit(row: int, text: str) -> None:
        if text.startswith(streamed[row]) and len(text) > len(streamed[row]):
            piece, streamed[row] = text[len(streamed[row]):], text
            if on_text is not None:
                on_text(row, piece)

    def on_token(row: int, token: int) -> None:
        rows[row].append(token)
        text = decode(row, rows[row])
        # Stream only text that is final: an incomplete UTF-8 sequence decodes to U+FFFD until its last byte
        # comes, and a tail that may begin a stop string waits until it is known not to.
        if not text.endswith("\ufffd"):
            emit(row, text[:len(text) - _stop_prefix_length(text, stop)])

    new_ids = generate_batch(model, prompt_ids, should_stop=stop_string_checker(tokenizer, stop) if stop else None,
                             on_token=on_token, **kwargs)
    texts = [decode(row, ids) for row, ids in enumerate(new_ids)]
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


def one_prompt(prompt: torch.Tensor | Sequence[int]) -> list[int]:
    """One prompt's token ids from a list, a (T,) or a (1, T) tensor: the forms tokenizers hand out."""
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"the prompt has shape {tuple(ids.shape)}: give one non-empty prompt, as a list of token "
                         "ids, a (T,) or a (1, T) tensor")
    return ids.tolist()


def eos_set(eos_id: int | Sequence[int] | None) -> set[int]:
    return set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
