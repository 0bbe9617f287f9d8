"""The micro-batch that flows from the data pipeline through objectives into the model.

Labels are already aligned with the inputs: `labels[b, t]` is the token the model must predict *at* position t
(the next token of the same document), or `IGNORE_INDEX` where nothing is trained (prompts, padding, the last
token of each document). Shifting happens once, in the data pipeline, so no label can cross a document boundary
and every consumer (loss, packing checks, token counts) sees the same alignment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor
    """(B, T) int64 token ids; padding positions hold the pad id."""
    labels: torch.Tensor
    """(B, T) int64 targets aligned with `input_ids` (see module docstring)."""
    position_ids: torch.Tensor
    """(B, T) int64 RoPE positions; they restart at 0 for every packed document."""
    document_ids: torch.Tensor | None = None
    """(B, T) int32 document index within each row for packed batches (padding gets its own id, -1);
    None means each row is one right-padded sequence, for which a plain causal mask is exact."""
    attention_lengths: torch.Tensor | None = None
    """(B,) real length of each row for unpacked batches (None when packed: use document_ids)."""

    @property
    def num_tokens(self) -> int:
        """Trained (non-ignored) target tokens in this micro-batch."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_padding(self) -> int:
        """Positions that hold no real token."""
        if self.document_ids is not None:
            return int((self.document_ids < 0).sum())
        return 0 if self.attention_lengths is None else int(self.input_ids.numel() - self.attention_lengths.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(input_ids=move(self.input_ids), labels=move(self.labels), position_ids=move(self.position_ids),
                     document_ids=move(self.document_ids), attention_lengths=move(self.attention_lengths))
