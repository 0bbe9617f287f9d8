"""Beam search with the static KV cache: keep the `num_beams` most likely continuations of one prompt.

    new_ids = beam_search(model, [1, 450, 2], num_beams=3, max_new_tokens=40, eos_id=2)

Each step scores every (beam, next token) pair by the sum of token log-probabilities, keeps the best `num_beams`
that do not end in EOS and sets aside those that do as finished hypotheses, scored by sum / length**length_penalty
(length counts the new tokens, EOS included). The cache rows follow their beams (`KVCache.reorder`). Search stops
when `num_beams` hypotheses have finished and no running beam can still beat the worst of them, or after
`max_new_tokens`; then the best hypothesis is returned. Without EOS this is exactly transformers' beam search.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from optrush.generate.decode import check_fits, eos_set, one_prompt
from optrush.models.kv_cache import KVCache


@torch.no_grad()
def beam_search(model: nn.Module, prompt: torch.Tensor | Sequence[int], *, num_beams: int, max_new_tokens: int,
                eos_id: int | Sequence[int] | None = None, length_penalty: float = 1.0) -> list[int]:
    """The new token ids of the best hypothesis (EOS included when it ended with one)."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams}, max_new_tokens={max_new_tokens}: both must be at least 1")
    prompt = one_prompt(prompt)
    device = model.tok_embeddings.weight.device
    P = len(prompt)
    max_len = P + max_new_tokens
    check_fits(model, prompt_len=P, max_new_tokens=max_new_tokens)
    eos = eos_set(eos_id)
    cache = KVCache.for_model(model, batch_size=num_beams, max_len=max_len)
    slots = torch.arange(max_len, device=device)
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device).expand(num_beams, P)
    # All beams start identical: only the first may expand, or the first step would pick one token num_beams times
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []

    was_training = model.training
    model.eval()
    try:
        logits = model(ids, position_ids=slots[:P].expand(num_beams, P), cache=cache, cache_position=slots[:P])
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1) + scores[:, None]
            vocab = logprobs.shape[-1]
            top, flat = logprobs.flatten().topk(2 * num_beams)
            kept: list[tuple[float, int, int]] = []
            for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
                parent, token = divmod(index, vocab)
                if token in eos:
                    if rank < num_beams:  # an EOS counts only among the best num_beams candidates
                        finished.append((score / (step + 1) ** length_penalty, beams[parent] + [token]))
                    continue
                kept.append((score, parent, token))
                if len(kept) == num_beams:
                    break
            finished = sorted(finished, key=lambda hyp: -hyp[0])[:num_beams]
            best_running = kept[0][0] / (step + 1) ** length_penalty
            if len(finished) == num_beams and best_running <= finished[-1][0]:
                break
            parents = torch.tensor([p for _, p, _ in kept], device=device)
            tokens = torch.tensor([t for _, _, t in kept], device=device)
            scores = torch.tensor([s for s, _, _ in kept], device=device)
            beams = [beams[p] + [t] for _, p, t in kept]
            if step == max_new_tokens - 1:
                break
            cache.reorder(parents)
            slot = P + step
            logits = model(tokens[:, None], position_ids=slots[slot:slot + 1].expand(num_beams, 1), cache=cache,
                           cache_position=slots[slot:slot + 1])
        finished += [(s / len(b) ** length_penalty, b) for s, b in zip(scores.tolist(), beams)]
        return max(finished, key=lambda hyp: hyp[0])[1]
    finally:
        model.train(was_training)
