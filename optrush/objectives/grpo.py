"""GRPO: group-relative policy optimisation on sampled completions (`objective=grpo`).

    objective = GRPO(cfg=cfg.grpo, tokenizer=tok, reference=frozen_copy, seed=0)
    loss_sum, metrics = objective(model, batch)     # batch: prompt rows of an unpacked `Batch` (data.packing=none)

For every prompt of the micro-batch, `group_size` completions are sampled from the current model
(`optrush.generate.sample.sample_next`, the k copies of a prompt decoded together), scored by the configured
reward functions (summed), and each completion gets the advantage A = (r - mean_group) / (std_group + 1e-4)
(DeepSeekMath, https://arxiv.org/abs/2402.03300). The loss of a completion is the mean over its tokens of

    -min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A) + kl_beta (exp(q) - q - 1),   q = log p_ref - log p,

with rho = p / p_old (the k3 KL estimator of http://joschu.net/blog/kl-approx.html). Sampling and the update
use the same weights (one update per generation), so rho is 1 in value and the clip never binds; it is kept
so the gradient is exactly PPO's, ready for several updates per generation. One unit per completion.

A reward function is `fn(prompts: list[str], completions: list[str]) -> list[float]`, named in config as
`module:function`; `recipe_format_reward` scores the recipe template (optrush.data.recipes).
"""
from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from optrush.config.schema import GRPOConfig
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.generate.sample import sample_next
from optrush.objectives.dpo import token_logps

RewardFn = Callable[[list[str], list[str]], list[float]]


def recipe_format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """In [0, 1]: a quarter each for `Ingredients:`, a `- ` ingredient line, `Directions:` then a `1. ` step."""
    scores = []
    for text in completions:
        ingredients = text.find("Ingredients:\n")
        directions = text.find("Directions:\n")
        checks = (ingredients >= 0, re.search(r"^- \S", text, re.M) is not None,
                  directions > ingredients >= 0, re.search(r"^1\. \S", text, re.M) is not None)
        scores.append(sum(checks) / len(checks))
    return scores


def import_reward(name: str) -> RewardFn:
    """`package.module:function` -> the function (errors name the config key grpo.rewards)."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"grpo.rewards: cannot import module {module_name!r} of {name!r} ({error})") from None
    if not callable(getattr(module, attr, None)):
        raise ValueError(f"grpo.rewards: {module_name} has no function {attr!r} (from {name!r})")
    return getattr(module, attr)


def prompts_of(batch: Batch) -> list[list[int]]:
    """The prompt tokens of every row: inputs up to and including the position of the first trained target."""
    prompts = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:first + 1])
    return prompts


@torch.no_grad()
def sample_group(model: nn.Module, prompt: list[int], *, k: int, max_new_tokens: int, temperature: float,
                 eos_id: int, generator: torch.Generator) -> list[list[int]]:
    """k completions of one prompt (each ends at its first EOS, included, or after max_new_tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * k, device=device)
    was_training = model.training
    model.eval()
    new = torch.empty(k, 0, dtype=torch.long)
    for _ in range(max_new_tokens):
        token = sample_next(model(ids)[:, -1, :], temperature=temperature, top_k=None, top_p=None,
                            generator=generator)
        new = torch.cat([new, token.view(k, 1)], dim=1)
        if (new == eos_id).any(dim=1).all():
            break
        ids = torch.cat([ids, token.to(device).view(k, 1)], dim=1)
    model.train(was_training)
    completions = []
    for row in new.tolist():
        completions.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return completions


def group_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(G*k,) rewards -> advantages normalised within each consecutive group of k."""
    groups = rewards.view(-1, k)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)).flatten()


class GRPO:
    def __init__(self, *, cfg: GRPOConfig, tokenizer, reference: nn.Module | None, seed: int = 0,
                 rewards: list[RewardFn] | None = None):
        self.cfg, self.tokenizer, self.reference = cfg, tokenizer, reference
        self.rewards = rewards if rewards is not None else [import_reward(name) for name in cfg.rewards]
        self.generator = torch.Generator().manual_seed(seed)
        self.totals: Counter = Counter()

    def units(self, batch: Batch) -> int:
        return batch.input_ids.shape[0] * self.cfg.group_size

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        k, tok = self.cfg.group_size, self.tokenizer
        prompts = prompts_of(batch)
        completions = [c for p in prompts for c in sample_group(
            model, p, k=k, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
            eos_id=tok.eos_token_id, generator=self.generator)]
        prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in prompts for _ in range(k)]
        completion_texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = torch.zeros(len(completions))
        for fn in self.rewards:
            rewards += torch.tensor(fn(prompt_texts, completion_texts), dtype=torch.float32)
        advantages = group_advantages(rewards, k).to(batch.input_ids.device)

        rollouts = completions_batch(prompts, completions, k=k, pad_id=tok.pad_token_id, device=batch.input_ids.device)
        logps = token_logps(model(rollouts.input_ids), rollouts.labels)
        trained = (rollouts.labels != IGNORE_INDEX).float()
        ratio = torch.exp(logps - logps.detach())
        clipped = ratio.clamp(1 - self.cfg.clip_eps, 1 + self.cfg.clip_eps)
        per_token = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
        kl = torch.zeros_like(per_token)
        if self.cfg.kl_beta > 0:
            with torch.no_grad():
                ref = token_logps(self.reference(rollouts.input_ids), rollouts.labels)
            q = ref - logps
            kl = torch.exp(q) - q - 1
            per_token = per_token + self.cfg.kl_beta * kl
        lengths = trained.sum(dim=1)
        loss_sum = ((per_token * trained).sum(dim=1) / lengths).sum()
        step = {"completions": len(completions), "reward": float(rewards.sum()),
                "kl": float(((kl.detach() * trained).sum(dim=1) / lengths).sum()),
                "completion_tokens": float(lengths.sum())}
        self.totals.update(step)
        return loss_sum, {"reward": step["reward"] / len(completions), "kl": step["kl"] / len(completions)}

    def pop_metrics(self) -> dict[str, float]:
        """Mean reward, KL to the reference and completion length since the last call."""
        totals, self.totals = self.totals, Counter()
        n = totals.pop("completions", 0)
        if not n:
            return {}
        return {"reward": totals["reward"] / n, "kl": totals["kl"] / n,
                "completion_tokens": totals["completion_tokens"] / n}


def completions_batch(prompts: list[list[int]], completions: list[list[int]], *, k: int, pad_id: int,
                      device: torch.device) -> Batch:
    """Right-padded rows of prompt + completion, targets on the completion tokens only."""
    rows = []
    for i, completion in enumerate(completions):
        prompt = prompts[i // k]
        sequence = prompt + completion
        rows.append((sequence[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + completion))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows], device=device)
    return Batch(input_ids=input_ids, labels=labels, position_ids=torch.arange(width, device=device).expand_as(
        input_ids), attention_lengths=torch.tensor([len(ids) for ids, _ in rows]))
