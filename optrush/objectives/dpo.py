"""The DPO family on packed preference pairs (`objective=dpo`, `dpo.loss=...`).

    objective = DPO(cfg=cfg.dpo, reference=frozen_copy)           # or reference_logps=precomputed (N, 2)
    loss_sum, metrics = objective(model, pairs)                   # pairs: optrush.data.preference.PairBatch

Every loss reads the summed completion log-probs of chosen (c) and rejected (r) under the policy and, for the
reference-based losses, under the reference (c0, r0); with h = (c - c0) - (r - r0), beta = dpo.beta and
eps = dpo.label_smoothing:

- `sigmoid` (DPO, https://arxiv.org/abs/2305.18290; label smoothing as in cDPO, which TRL 1.16's DPOTrainer
  no longer applies to sigmoid):
  -(1 - eps) log s(beta h) - eps log s(-beta h)
- `ipo` (https://arxiv.org/abs/2310.12036): (h - 1 / (2 beta))^2, with length-averaged log-probs as in TRL
- `hinge` (SLiC, https://arxiv.org/abs/2305.10425): max(0, 1 - beta h)
- `robust` (https://arxiv.org/abs/2403.00409): ((1 - eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps)
- `simpo` (https://arxiv.org/abs/2405.14734, no reference): with average log-probs a_c, a_r and
  z = beta (a_c - a_r) - gamma: -(1 - eps) log s(z) - eps log s(-z)
- `orpo` (https://arxiv.org/abs/2403.07691, no reference): the chosen completion's mean token NLL minus
  beta log s(log odds(a_c) - log odds(a_r)), with log odds(a) = a - log(1 - exp(a)). TRL averages the NLL over
  all chosen tokens of the batch, prompt tokens included; here it is per pair and over the completion only, as in
  SFT on the chosen response, like every other loss of the family.

tests/test_dpo_trl.py checks every loss against TRL's own loss code where TRL is installed (the `dev` extra).

The loss is summed over pairs; the loop divides by the step's pair count. The reference is a frozen copy of the
starting model, its log-probs computed once by `precompute_reference_logps` and cached on disk, or (LoRA/DoRA
runs, `dpo.reference=lora_disabled`) the policy itself with its adapters switched off: the base weights are the
starting model, so this is the copy reference without a second model in memory.
"""
from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optrush.atomic import written_whole
from optrush.config.schema import DPOConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.preference import PairBatch, PairLoader, PreferencePair
from optrush.kernels.attention import build_block_mask, flex_attention_fn
from optrush.models.layers import AttentionBackend, sdpa_attention
from optrush.objectives.logps import chunked_logps_head, token_logps
from optrush.parallel.distributed import is_main
from optrush.peft.lora import adapters_disabled

REFERENCE_FREE = ("simpo", "orpo")


def shared_prompt_visible(q: torch.Tensor, kv: torch.Tensor, pair_q: torch.Tensor, pair_kv: torch.Tensor,
                          branch_q: torch.Tensor, branch_kv: torch.Tensor) -> torch.Tensor:
    """May query position `q` see key position `kv`? Earlier keys of its own pair that are on the shared prompt
    (branch 0) or on its own branch, so the rejected branch never sees the chosen one laid out before it. One
    predicate for the dense mask (broadcast tensors) and FlexAttention's mask_mod (index tensors)."""
    return (q >= kv) & (pair_q == pair_kv) & ((branch_kv == 0) | (branch_q == branch_kv))


def shared_prompt_mask(segments: torch.Tensor, *, seq_len: int, sliding_window: int | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask for shared-prompt rows; `segments` (B, T, 2) holds (pair id, branch id) per
    position (`PairBatch.branch_ids`), see `shared_prompt_visible`."""
    no_sliding_window(sliding_window)
    pair, branch = segments[..., 0], segments[..., 1]
    idx = torch.arange(seq_len, device=segments.device)
    visible = shared_prompt_visible(idx[:, None], idx[None, :], pair[:, :, None], pair[:, None, :],
                                    branch[:, :, None], branch[:, None, :])
    return visible[:, None]


def shared_prompt_block_mask(segments: torch.Tensor, *, seq_len: int, sliding_window: int | None = None,
                             device: torch.device | str | None = None):
    """The same rule as a FlexAttention BlockMask: 128 x 128 blocks between pairs, or between the two branches of
    a pair, are skipped instead of computed and masked."""
    no_sliding_window(sliding_window)
    pair, branch = segments[..., 0], segments[..., 1]

    def keep(b, h, q, kv):
        return shared_prompt_visible(q, kv, pair[b, q], pair[b, kv], branch[b, q], branch[b, kv])

    return build_block_mask(keep, batch=segments.shape[0], seq_len=seq_len, device=segments.device)


def no_sliding_window(sliding_window: int | None) -> None:
    if sliding_window is not None:
        raise ValueError("shared-prompt packing does not support sliding-window models; set data.shared_prompt=false")


SHARED_PROMPT_SDPA = AttentionBackend(name="sdpa_shared_prompt", build_mask=shared_prompt_mask,
                                      attend=sdpa_attention)
"""SDPA with the dense shared-prompt mask; swapped in for one forward pass by `pair_forward` (also for varlen
models: variable-length attention cannot express a prompt shared by two branches)."""
SHARED_PROMPT_FLEX = AttentionBackend(name="flex_shared_prompt", build_mask=shared_prompt_block_mask,
                                      attend=flex_attention_fn)
"""FlexAttention with the shared-prompt block mask, for models whose backend is flex (`model.attention=flex`)."""


def pair_forward(model: nn.Module, pairs: PairBatch, *, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's output (logits, or rewards with a reward head; with `labels`, its `loss_fn` of them) for
    every position of a pair micro-batch."""
    b = pairs.batch
    if pairs.branch_ids is None:
        return model(b.input_ids, position_ids=b.position_ids, document_ids=b.document_ids, labels=labels)
    backend = model.attention_backend
    model.set_attention_backend(SHARED_PROMPT_FLEX if backend.name == "flex" else SHARED_PROMPT_SDPA)
    try:
        segments = torch.stack([b.document_ids.long(), pairs.branch_ids], dim=-1)
        return model(b.input_ids, position_ids=b.position_ids, document_ids=segments, labels=labels)
    finally:
        model.set_attention_backend(backend)


def sequence_logps(model: nn.Module, pairs: PairBatch, *,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (2P,), completion token counts (2P,)) of the micro-batch's sequences, from
    the full logits or (`chunk_tokens`, see optrush.objectives.logps) chunk by chunk."""
    b = pairs.batch
    if chunk_tokens is None:
        per_token = token_logps(pair_forward(model, pairs), b.labels).flatten()
    else:
        with chunked_logps_head(model, chunk_tokens=chunk_tokens):
            per_token = pair_forward(model, pairs, labels=b.labels).flatten()
    sequence = pairs.sequence_ids.clamp(min=0).flatten()  # padding adds 0 (its label is ignored)
    n = 2 * pairs.num_pairs
    logps = per_token.new_zeros(n).index_add(0, sequence, per_token)
    counts = per_token.new_zeros(n).index_add(0, sequence, (b.labels != IGNORE_INDEX).flatten().float())
    return logps, counts


def log_odds_of(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p < 0. `-expm1` keeps 1 - p exact as p nears 1 (an fp32 log p above -6e-8 has
    exp(log p) == 1, so log1p(-exp(log p)) is -inf and its gradient NaN), and no `torch.where` branch is needed,
    whose masked side would still send NaN into the gradient. Only log p == 0 exactly (p == 1) stays infinite."""
    return logp - torch.log(-torch.expm1(logp))


def preference_losses(loss: str, *, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                      rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None,
                      ref_rejected: torch.Tensor | None, beta: float, label_smoothing: float = 0.0,
                      gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), all (P,), from summed log-probs (see module doc)."""
    eps = label_smoothing
    if loss in REFERENCE_FREE:
        avg_c, avg_r = chosen / chosen_tokens, rejected / rejected_tokens
        if loss == "simpo":
            z = beta * (avg_c - avg_r) - gamma
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:
            log_odds = log_odds_of(avg_c) - log_odds_of(avg_r)
            losses = -avg_c - beta * F.logsigmoid(log_odds)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "ipo":
        h = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = chosen_ratio - rejected_ratio
        if loss == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss == "hinge":
            losses = torch.relu(1 - beta * h)
        elif loss == "robust":
            losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        else:
            raise ValueError(f"unknown dpo.loss {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO:
    """`(model, pairs) -> (summed preference loss, metrics)`; one unit per pair. The reference is a frozen
    `reference` model, a `reference_logps` table, or (`cfg.reference == "lora_disabled"`, neither given) the
    policy with its adapters disabled. `chunk_tokens` (kernels.loss_chunk_tokens when kernels.fused_loss) computes
    the policy's and the reference's log-probs without the full logits."""

    TOTALS = ("pairs", "correct", "margin", "chosen_reward", "rejected_reward")
    """The sums `pop_metrics` averages: a fixed set, so a rank that saw no pair still sums zeros over every key."""
    METRIC_NAMES = {"correct": "accuracy", "margin": "reward_margin", "chosen_reward": "chosen_reward",
                    "rejected_reward": "rejected_reward"}

    def __init__(self, *, cfg: DPOConfig, reference: nn.Module | None = None,
                 reference_logps: torch.Tensor | None = None, chunk_tokens: int | None = None):
        given = (reference is not None) + (reference_logps is not None)
        needed = 0 if cfg.loss in REFERENCE_FREE or cfg.reference == "lora_disabled" else 1
        if given != needed:
            raise ValueError(f"dpo.loss={cfg.loss}, dpo.reference={cfg.reference} needs "
                             f"{'no' if needed == 0 else 'exactly one'} reference model or reference log-probs")
        self.cfg, self.reference, self.reference_logps = cfg, reference, reference_logps
        self.chunk_tokens = chunk_tokens
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))

    def units(self, pairs: PairBatch) -> int:
        return pairs.num_pairs

    def reference_of(self, model: nn.Module, pairs: PairBatch) -> torch.Tensor | None:
        """(2P,) reference log-probs of the micro-batch's sequences, or None for reference-free losses."""
        if self.cfg.loss in REFERENCE_FREE:
            return None
        if self.reference_logps is not None:
            return self.reference_logps[pairs.pair_index.cpu()].flatten().to(pairs.input_ids.device)
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, pairs, chunk_tokens=self.chunk_tokens)[0]
            with adapters_disabled(model):
                return sequence_logps(model, pairs, chunk_tokens=self.chunk_tokens)[0]

    def __call__(self, model: nn.Module, pairs: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logps, counts = sequence_logps(model, pairs, chunk_tokens=self.chunk_tokens)
        ref = self.reference_of(model, pairs)
        losses, chosen_rewards, rejected_rewards = preference_losses(
            self.cfg.loss, chosen=logps[0::2], rejected=logps[1::2], chosen_tokens=counts[0::2],
            rejected_tokens=counts[1::2], ref_chosen=None if ref is None else ref[0::2],
            ref_rejected=None if ref is None else ref[1::2], beta=self.cfg.beta,
            label_smoothing=self.cfg.label_smoothing, gamma=self.cfg.simpo_gamma)
        margin = chosen_rewards - rejected_rewards
        step = {"pairs": pairs.num_pairs, "correct": float((margin > 0).sum()), "margin": float(margin.sum()),
                "chosen_reward": float(chosen_rewards.sum()), "rejected_reward": float(rejected_rewards.sum())}
        self.totals.update(step)
        return losses.sum(), {k: v / pairs.num_pairs for k, v in step.items() if k != "pairs"}

    def pop_metrics(self, reduce: Callable[[Counter], Mapping[str, float]] | None = None) -> dict[str, float]:
        """Mean implicit rewards, margin and ranking accuracy over the pairs since the last call; `reduce` (the
        loop's `sum_over_ranks`) sums the totals over all ranks first."""
        totals = reduce(self.totals) if reduce else self.totals
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))
        if not totals["pairs"]:
            return {}
        return {name: totals[key] / totals["pairs"] for key, name in self.METRIC_NAMES.items()}

    def state_dict(self) -> dict:
        """Nothing to keep across a resume (see optrush.objectives)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pairs_fingerprint(pairs: list[PreferencePair]) -> int:
    crc = 0
    for pair in pairs:
        for example in (pair.chosen, pair.rejected):
            crc = zlib.crc32(repr((example.input_ids, example.labels)).encode(), crc)
    return crc


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, pairs: list[PreferencePair], *, cache: str | Path, pad_id: int,
                               max_length: int, rows: int, chunk_tokens: int | None = None) -> torch.Tensor:
    """(N, 2) CPU fp32 summed log-probs of every pair's chosen and rejected completion under `model`, indexed by
    `PreferencePair.index`. Read from `cache` when it was written for the same pairs and the same weights,
    else computed (packed, in index order) and written there. Says which on the main rank: computing takes a
    forward pass over every pair, long enough on a CPU to look like a hang before step 1."""
    cache = Path(cache)
    weights = sum(float(p.double().sum()) for p in model.parameters())
    fingerprint = f"pairs={pairs_fingerprint(pairs)} weights={weights!r}"
    what = f"the reference model's log-probs of {len(pairs)} pairs (dpo.reference=precomputed)"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["fingerprint"] == fingerprint:
            print_on_main_rank(f"read {what} from {cache}, written by an earlier run with the same pairs and "
                               "starting weights")
            return saved["logps"]
    print_on_main_rank(f"computing {what}...")
    started = time.perf_counter()
    loader = PairLoader(pairs, strategy="bfd", rows=rows, max_length=max_length, pad_id=pad_id, seed=0,
                        shuffle=False)
    was_training = model.training
    model.eval()
    table = pair_table(lambda m, batch: sequence_logps(m, batch, chunk_tokens=chunk_tokens)[0], model, loader,
                       size=max(p.index for p in pairs) + 1)
    model.train(was_training)
    if is_main():  # every rank computed the same table; one writes it, whole or not at all
        cache.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(cache) as partial:
            torch.save({"fingerprint": fingerprint, "logps": table}, partial)
    print_on_main_rank(f"computed {what} in {time.perf_counter() - started:.1f} s; cached in {cache} for a rerun "
                       "with the same pairs and starting weights")
    return table


def pair_table(score, model: nn.Module, loader: PairLoader, *, size: int) -> torch.Tensor:
    """(size, 2) fp32 CPU table of `score(model, batch)` ((2P,) values: chosen, rejected, ...) over one epoch of
    `loader`, row `PreferencePair.index`."""
    device = next(model.parameters()).device
    table = torch.zeros(size, 2)
    for _ in range(loader.batches_per_epoch):
        batch = next(loader).to(device)
        table[batch.pair_index.cpu()] = score(model, batch).view(-1, 2).float().cpu()
    return table


def print_on_main_rank(line: str) -> None:
    if is_main():
        print(line, flush=True)
