"""Next-token prediction: the objective for pretraining (`causal_lm`) and supervised fine-tuning (`sft`).

Both are the same loss; they differ only in which targets the data pipeline leaves unmasked (every token for raw
text, completion tokens for prompt/completion and chat data). The loss is a *sum* over trained tokens: the training
loop divides by the trained-token count of the whole optimizer step, so gradient accumulation and padding cannot
change the weighting of tokens (a per-micro-batch mean would).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from optrush.data.batch import Batch


class CausalLM:
    """`(model, batch) -> (summed token loss, metrics)`; `units(batch)` is what the loss is normalised by."""

    def __init__(self, name: str = "causal_lm"):
        self.name = name

    def units(self, batch: Batch) -> int:
        return batch.num_tokens

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum = model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids,
                         labels=batch.labels, reduction="sum")
        return loss_sum, {}

    def pop_metrics(self, reduce: Callable | None = None) -> dict[str, float]:
        """No metrics beyond the loss (the loop logs that), so nothing for `reduce` to sum over ranks."""
        return {}

    def state_dict(self) -> dict:
        """Nothing to keep across a resume (see optrush.objectives)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
