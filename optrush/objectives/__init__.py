"""Objectives turn (model, batch) into a summed loss; the one training loop normalises and steps.

Each objective has `units(batch)` (what its loss is summed over: trained tokens for language modelling) and
`__call__(model, batch) -> (loss_sum, metrics)`.
"""
from optrush.objectives.causal_lm import CausalLM

OBJECTIVES = {"causal_lm": CausalLM, "sft": CausalLM}


def build_objective(name: str) -> CausalLM:
    return OBJECTIVES[name](name)


__all__ = ["CausalLM", "OBJECTIVES", "build_objective"]
