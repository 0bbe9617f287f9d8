"""Objectives turn (model, batch) into a summed loss; the one training loop normalises and steps.

Each objective has `units(batch)` (what its loss is summed over: trained tokens for language modelling, pairs for
reward and DPO, completions for GRPO), `__call__(model, batch) -> (loss_sum, metrics)`, `pop_metrics(reduce=None)`
(its metrics averaged since the last call, for the loop's log) and `state_dict()`/`load_state_dict(state)` (what a
checkpoint must keep for an exact resume: GRPO's rollouts and sampling generator; empty for the others).

Metrics under data parallelism average over every rank's batches, as the loss does: an objective keeps its metric
sums under a fixed set of keys (`TOTALS`, zero until seen), and the loop passes `reduce=partial(sum_over_ranks,
device=...)` at every log step, on every rank, so all ranks enter the one all-reduce with the same keys.

    objective = build_objective("sft")                                   # language modelling needs nothing else
    objective = build_objective(cfg.objective, cfg=cfg, model=model, tokenizer=tok, examples=train + evals)

Alignment objectives are built from the starting model *before* the loop's optimizations: `reward` puts a scalar
head on it, `dpo` and `grpo` keep a frozen copy as reference (or, for `dpo.reference=precomputed`, its log-probs
of `examples`, cached on disk; for `dpo.reference=lora_disabled`, nothing: the reference is the trained model
with its adapters switched off). `kernels.fused_loss=true` makes DPO and GRPO compute their log-probs chunk by
chunk, never holding the full logits (optrush.objectives.logps).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from optrush.objectives.causal_lm import CausalLM
from optrush.objectives.dpo import DPO, REFERENCE_FREE, precompute_reference_logps
from optrush.objectives.grpo import GRPO
from optrush.objectives.reward import RewardModel, apply_reward_head
from optrush.parallel.distributed import rank


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def logps_chunk_tokens(cfg) -> int | None:
    """Chunk size of the log-probs' output head: kernels.loss_chunk_tokens under kernels.fused_loss, else None
    (full logits)."""
    return cfg.kernels.loss_chunk_tokens if cfg.kernels.fused_loss else None


def build_reward(*, cfg, model, tokenizer, examples) -> RewardModel:
    apply_reward_head(model, pad_token_id=tokenizer.pad_token_id)  # HF finds each row's last token by it
    return RewardModel(margin=cfg.reward.margin)


def build_dpo(*, cfg, model, tokenizer, examples) -> DPO:
    chunk_tokens = logps_chunk_tokens(cfg)
    if cfg.dpo.loss in REFERENCE_FREE or cfg.dpo.reference == "lora_disabled":
        return DPO(cfg=cfg.dpo, chunk_tokens=chunk_tokens)
    if cfg.dpo.reference == "precomputed":
        table = precompute_reference_logps(model, list(examples), cache=Path(cfg.output_dir) / "reference_logps.pt",
                                           pad_id=tokenizer.pad_token_id, max_length=cfg.data.max_length,
                                           rows=cfg.train.micro_batch_size, chunk_tokens=chunk_tokens)
        return DPO(cfg=cfg.dpo, reference_logps=table, chunk_tokens=chunk_tokens)
    return DPO(cfg=cfg.dpo, reference=frozen_copy(model), chunk_tokens=chunk_tokens)


def build_grpo(*, cfg, model, tokenizer, examples) -> GRPO:
    reference = frozen_copy(model) if cfg.grpo.kl_beta > 0 and cfg.grpo.reference == "copy" else None
    # each data-parallel rank draws its own completions (rank 0 of a single process: train.seed itself)
    return GRPO(cfg=cfg.grpo, tokenizer=tokenizer, reference=reference, seed=cfg.train.seed + rank(),
                micro_batches=cfg.train.grad_accum, chunk_tokens=logps_chunk_tokens(cfg))


OBJECTIVES = {"reward": build_reward, "dpo": build_dpo, "grpo": build_grpo}
PAIRWISE = ("reward", "dpo")
"""Objectives trained on preference pairs (optrush.data.preference) rather than examples."""
UNITS = {"causal_lm": "tokens", "sft": "tokens", "reward": "pairs", "dpo": "pairs", "grpo": "completions"}
"""What each objective's `units(batch)` counts; the loop logs their number as `trained_<units>`."""


def build_objective(name: str, *, cfg=None, model: nn.Module | None = None, tokenizer=None,
                    examples: Sequence = ()) -> CausalLM | RewardModel | DPO | GRPO:
    if name in ("causal_lm", "sft"):
        return CausalLM(name)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected causal_lm, sft, {', '.join(OBJECTIVES)}")
    if cfg is None or model is None:
        raise ValueError(f"objective={name} is built from the config and the starting model: "
                         "build_objective(name, cfg=cfg, model=model, tokenizer=tokenizer, examples=...)")
    return OBJECTIVES[name](cfg=cfg, model=model, tokenizer=tokenizer, examples=examples)


__all__ = ["CausalLM", "DPO", "GRPO", "OBJECTIVES", "PAIRWISE", "UNITS", "RewardModel", "apply_reward_head",
           "build_objective"]
