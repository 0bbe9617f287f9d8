"""Contrastive search (SimCTG, https://arxiv.org/abs/2202.06417) with the static KV cache, for one prompt.

    new_ids = contrastive_search(model, [1, 450, 2], penalty_alpha=0.6, top_k=4, max_new_tokens=64, eos_id=2)
    optrush generate CKPT --prompt "Recipe: Soup" --penalty-alpha 0.6 --top-k 4

At every step the `top_k` most likely next tokens are candidates; each is fed to the model (the k candidates as k
rows of one batch), and the one maximising

    (1 - alpha) * p(candidate) - alpha * max_j cos(h_candidate, h_j)

is kept, where h is the model's last hidden state (the final norm's output, transformers' `hidden_states[-1]`)
and j runs over every earlier position, prompt included. alpha = 0 is greedy decoding; larger alpha penalises
continuations whose representation repeats the context (degeneration). This is transformers' definition (its
contrastive search now lives on the Hub as `transformers-community/contrastive-search`); the candidate's forward
doubles as the next step's, and the cache rows then all take the chosen candidate's (`KVCache.reorder`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optrush.generate.decode import check_fits, eos_set, one_prompt
from optrush.models.kv_cache import KVCache


def degeneration_penalty(context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(k,) max cosine similarity of each candidate hidden state (k, D) to the context's (L, D)."""
    return (F.normalize(candidates.float(), dim=-1) @ F.normalize(context.float(), dim=-1).T).amax(dim=-1)


@torch.no_grad()
def contrastive_search(model: nn.Module, prompt: torch.Tensor | Sequence[int], *, penalty_alpha: float, top_k: int,
                       max_new_tokens: int, eos_id: int | Sequence[int] | None = None) -> list[int]:
    """The new token ids (EOS included when reached). The model is in eval mode meanwhile."""
    if not 0 <= penalty_alpha <= 1 or top_k < 1 or max_new_tokens < 1:
        raise ValueError(f"penalty_alpha={penalty_alpha}, top_k={top_k}, max_new_tokens={max_new_tokens}: use an "
                         "alpha in [0, 1], top_k >= 1 and max_new_tokens >= 1")
    prompt = one_prompt(prompt)
    device = model.tok_embeddings.weight.device
    P = len(prompt)
    check_fits(model, prompt_len=P, max_new_tokens=max_new_tokens)
    eos = eos_set(eos_id)
    cache = KVCache.for_model(model, batch_size=top_k, max_len=P + max_new_tokens)
    slots = torch.arange(P + max_new_tokens, device=device)
    hidden: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))

    was_training = model.training
    model.eval()
    try:
        ids = torch.as_tensor(prompt, dtype=torch.long, device=device).expand(top_k, P)
        logits = model(ids, position_ids=slots[:P].expand(top_k, P), cache=cache, cache_position=slots[:P])[0, -1]
        context = hidden.pop()[0]  # (P, D)
        new: list[int] = []
        for step in range(max_new_tokens):
            probs, candidates = torch.softmax(logits.float(), dim=-1).topk(top_k)
            slot = P + step
            logits_k = model(candidates[:, None], position_ids=slots[slot:slot + 1].expand(top_k, 1), cache=cache,
                             cache_position=slots[slot:slot + 1])[:, -1]
            candidate_hidden = hidden.pop()[:, -1]  # (k, D)
            score = (1 - penalty_alpha) * probs - penalty_alpha * degeneration_penalty(context, candidate_hidden)
            best = int(score.argmax())
            new.append(int(candidates[best]))
            if new[-1] in eos:
                break
            cache.reorder(torch.full((top_k,), best, device=device))
            context = torch.cat([context, candidate_hidden[best:best + 1]])
            logits = logits_k[best]
        return new
    finally:
        hook.remove()
        model.train(was_training)
