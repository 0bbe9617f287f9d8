"""The fallback for checkpoints the native model does not implement: a transformers model behind the same
forward signature as `optrush.models.llama.Transformer`, so the training loop and objectives run unchanged.

    model = HFCausalLM.from_pretrained("path/to/gemma", dtype=torch.bfloat16, device="cuda")
    loss = model(input_ids, position_ids=pos, labels=labels, reduction="sum")

What it cannot do: packed attention (`document_ids` raises; use data.packing=none), the fused loss (the loss is
plain cross-entropy over full fp32 logits), and the native per-block FSDP2/compile/checkpointing plans.
`optrush.models.io.load_model` returns it with a warning that says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from optrush.data.batch import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel

UNAVAILABLE = ("packed attention (document_ids; use data.packing=none)", "the fused chunked loss",
               "native per-block FSDP2/compile/activation-checkpointing plans")


class HFCausalLM(nn.Module):
    def __init__(self, hf_model: "PreTrainedModel"):
        super().__init__()
        self.hf = hf_model
        self.vocab_size: int = hf_model.config.vocab_size

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> "HFCausalLM":
        from transformers import AutoModelForCausalLM  # imported here: it costs seconds, and only this path needs it

        # trust_remote_code stays off: a checkpoint directory must never run code it ships
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(hf_model.to(device))

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        if document_ids is not None:
            raise ValueError(f"{type(self.hf).__name__} runs through transformers and cannot do packed "
                             "(document-masked) attention: set data.packing=none")
        logits = self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        if labels is None:
            return logits
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.hf.get_input_embeddings().weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> int:
        """The same 6N + 6 * L * T * d estimate as the native model, from the HF config."""
        cfg = self.hf.config
        return 6 * self.num_params() + 6 * cfg.num_hidden_layers * seq_len * cfg.hidden_size

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int) -> None:
        self.hf.save_pretrained(str(path), max_shard_size=max_shard_bytes)
