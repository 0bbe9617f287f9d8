"""Prompt tuning (Lester et al., arXiv:2104.08691): n learned "virtual token" embeddings prepended to every
sequence; the whole model stays frozen.

    model = apply_prompt_tuning(model, cfg)        # cfg.peft.num_virtual_tokens, cfg.peft.prompt_init
    logits = model(input_ids)                      # (B, T, V): the prompt's own positions are dropped
    loss = model(input_ids, labels=labels)         # the prompt positions are never trained

The embedding table becomes a `PromptEmbedding` that keeps the same `weight` (so the parameter names, the tied
head and the HF export are unchanged) and adds `prompt` (n, dim); ids >= vocab_size select prompt rows. A forward
pre-hook on our Transformer prepends those ids to each row and extends what goes with them: positions (the prompt
takes 0..n-1, the text n.., as in PEFT, which gives the concatenated embeddings default positions), labels
(IGNORE_INDEX) and document ids (the prompt joins the row's document). A forward hook cuts the prompt positions
off the logits. A row must hold one document (data.packing none or sorted, checked by the config): each packed
document would need its own prompt. Exported in PEFT format by optrush.peft.export (`prompt_embeddings`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optrush.data.batch import IGNORE_INDEX
from optrush.models.llama import Transformer


class PromptEmbedding(nn.Module):
    """The model's (frozen) token embedding plus `num_virtual_tokens` trainable rows addressed as ids
    vocab_size, vocab_size + 1, ..."""

    def __init__(self, base: nn.Embedding, *, num_virtual_tokens: int, init: str, generator: torch.Generator):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.vocab_size, dim = self.weight.shape
        if init == "vocab":  # PEFT's SAMPLE_VOCAB: start from real token embeddings
            rows = torch.randint(0, self.vocab_size, (num_virtual_tokens,), generator=generator)
            start = self.weight.detach()[rows.to(self.weight.device)].clone()
        else:
            start = torch.randn(num_virtual_tokens, dim, generator=generator) * self.weight.detach().float().std()
        self.prompt = nn.Parameter(start.to(device=self.weight.device, dtype=self.weight.dtype))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def virtual_ids(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.vocab_size, self.vocab_size + self.num_virtual_tokens,
                            device=device).expand(batch_size, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.vocab_size
        tokens = F.embedding(ids.clamp(max=self.vocab_size - 1), self.weight)
        prompts = F.embedding((ids - self.vocab_size).clamp(min=0), self.prompt)
        return torch.where(virtual[..., None], prompts, tokens)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, num_virtual_tokens={self.num_virtual_tokens}"


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the same call with the virtual tokens in front of every row."""
    if kwargs.get("cache") is not None:
        raise ValueError("prompt tuning: KV-cache decoding is not supported on a prompt-tuned model; export the "
                         "adapter (PEFT format) and generate with peft, or fold the prompt into the input text")
    (input_ids,) = args
    embed: PromptEmbedding = model.tok_embeddings
    B, T = input_ids.shape
    n, device = embed.num_virtual_tokens, input_ids.device
    kwargs = dict(kwargs)
    positions = kwargs.get("position_ids")
    positions = torch.arange(T, device=device).expand(B, T) if positions is None else positions
    kwargs["position_ids"] = torch.cat([torch.arange(n, device=device).expand(B, n), positions + n], dim=1)
    documents = kwargs.get("document_ids")
    if documents is not None:
        if (documents > 0).any():
            raise ValueError("prompt tuning needs one document per row, but this batch is packed (document_ids "
                             "> 0): set data.packing=none or sorted")
        kwargs["document_ids"] = torch.cat([documents.new_zeros(B, n), documents], dim=1)
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((B, n), IGNORE_INDEX), labels], dim=1)
    return (torch.cat([embed.virtual_ids(B, device), input_ids], dim=1),), kwargs


def _drop_prompt_logits(model: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: logits of the text positions only (a loss, with labels, passes through)."""
    if kwargs.get("labels") is not None:
        return output
    return output[:, model.tok_embeddings.num_virtual_tokens:]


def apply_prompt_tuning(model: nn.Module, cfg) -> nn.Module:
    """Freeze `model` (our Transformer) and give it a trainable soft prompt of `cfg.peft.num_virtual_tokens`
    (a `Config`), in place. The init draws from a generator seeded by train.seed: the global RNG is untouched."""
    if not isinstance(model, Transformer):
        raise ValueError(f"peft.method=prompt_tuning needs the native Llama-family model, not {type(model).__name__} "
                         "(a checkpoint loaded through transformers)")
    return add_prompt(model, num_virtual_tokens=cfg.peft.num_virtual_tokens, init=cfg.peft.prompt_init,
                      seed=cfg.train.seed)


def add_prompt(model: Transformer, *, num_virtual_tokens: int, init: str = "vocab", seed: int = 0) -> Transformer:
    """`apply_prompt_tuning` with explicit arguments (loading a PEFT prompt-tuning adapter uses this)."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    model.tok_embeddings = PromptEmbedding(model.tok_embeddings, num_virtual_tokens=num_virtual_tokens, init=init,
                                           generator=generator)
    model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    model.register_forward_hook(_drop_prompt_logits, with_kwargs=True)
    return model


def prompt_embedding(model: nn.Module) -> PromptEmbedding | None:
    """The model's soft prompt module, or None when it is not prompt-tuned."""
    return next((m for m in model.modules() if isinstance(m, PromptEmbedding)), None)
