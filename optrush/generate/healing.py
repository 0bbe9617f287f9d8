"""Token healing: a prompt that ends mid-word is tokenized at a boundary that the model rarely saw in training
("Preheat the ov" ends in the token " ov", while the data had " oven"), which skews the first new token. Healing
backs off the prompt's last token and constrains the first generated token to the vocabulary entries whose text
starts with the removed text, so the model itself chooses how to complete it (Guidance's token healing,
https://github.com/guidance-ai/guidance; transformers' `token_healing`).

    ids, removed, first_allowed = heal_prompts(tokenizer, [tokenizer.encode("Preheat the ov")], vocab_size=V,
                                               device="cpu")
    generate_texts(model, tokenizer, ["Preheat the ov"], token_healing=True, max_new_tokens=20)   # the usual way

One token is backed off (the one a mid-word cut leaves incomplete). A prompt of a single token, or ending in a
special token, is left as it is. The continuation text shown to the user excludes the removed text again.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def vocabulary_texts(tokenizer) -> list[str]:
    """The text of every token id of `tokenizer`, decoded alone."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def heal_prompts(tokenizer, prompts: Sequence[Sequence[int]], *, vocab_size: int,
                 device: torch.device | str) -> tuple[list[list[int]], list[str], torch.Tensor]:
    """(prompts without their last token, the removed texts, (B, vocab_size) bool mask of the tokens allowed
    first: those whose text starts with the removed text; all tokens where nothing was removed)."""
    texts = vocabulary_texts(tokenizer)
    special = set(tokenizer.all_special_ids)
    allowed = torch.ones(len(prompts), vocab_size, dtype=torch.bool)
    healed, removed = [], []
    for row, ids in enumerate(prompts):
        ids = list(ids)
        if len(ids) < 2 or ids[-1] in special:
            healed.append(ids)
            removed.append("")
            continue
        tail = texts[ids[-1]]
        extends = torch.tensor([t.startswith(tail) for t in texts])
        allowed[row] = False
        allowed[row, :len(texts)] = extends
        healed.append(ids[:-1])
        removed.append(tail)
    return healed, removed, allowed.to(device)
