"""GRPO: group-relative policy optimisation on sampled completions (`objective=grpo`).

    objective = GRPO(cfg=cfg.grpo, tokenizer=tok, reference=frozen_copy, seed=0, micro_batches=1)
    loss_sum, metrics = objective(model, batch)     # batch: prompt rows of an unpacked `Batch` (data.packing=none)

For every prompt of the micro-batch, `group_size` completions are sampled from the current model with the KV-cache
batched decoder (`optrush.generate.decode.generate_batch`, all prompts x k in one batch), scored by the configured
reward functions (summed), and each completion gets the advantage A = (r - mean_group) / (std_group + 1e-4)
(DeepSeekMath, https://arxiv.org/abs/2402.03300). The loss of a completion is the mean over its tokens of

    -min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A) + kl_beta (exp(q) - q - 1),   q = log p_ref - log p,

with rho = p / p_old (the k3 KL estimator of http://joschu.net/blog/kl-approx.html). One unit per completion.

Several updates per generation (`grpo.updates_per_generation` = u, TRL's `num_iterations`): the one training loop
calls the objective once per micro-batch, so the objective keeps the rollouts of the last generation (one per
micro-batch slot of an optimizer step, `micro_batches` = train.grad_accum) and serves them again for the next u - 1
optimizer steps, with the sampling policy's log-probs p_old stored at generation; from the second update on rho
moves off 1 and the clip binds. The prompts the loop hands in during those reused steps are not sampled from (an
epoch of prompts then takes u times as many steps of which 1/u generate). The rollouts, the call count and the
sampling generator are `state_dict()`, so a resumed run continues exactly. In evaluation (the model in eval mode)
completions are sampled fresh from a generator seeded with `seed`, leaving the training state untouched.

The reference is a frozen copy of the starting model, or (`grpo.reference=lora_disabled`, LoRA/DoRA runs) the
trained model with its adapters switched off; its log-probs are computed once per rollout. With `chunk_tokens`
(kernels.loss_chunk_tokens when kernels.fused_loss) every log-prob is computed without the full logits
(optrush.objectives.logps).

A reward function is `fn(prompts: list[str], completions: list[str]) -> list[float]`, named in config as
`package.module:function` (importable: installed or on PYTHONPATH) or `path/to/file.py:function` (a file, relative
to the working directory); `recipe_format_reward` scores the recipe template (optrush.data.recipes). Importing it
checks that it takes the two lists, and every call that it returns one finite number per completion (prompts x
group_size, each prompt repeated group_size times).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
import reprlib
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from optrush.config import ConfigError
from optrush.config.errors import did_you_mean
from optrush.config.schema import GRPOConfig
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.generate.decode import generate_batch
from optrush.objectives.logps import label_logps
from optrush.parallel.distributed import world_size
from optrush.peft.lora import adapters_disabled

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


def import_rewards(names: list[str]) -> list[tuple[str, RewardFn]]:
    """(name, function) of every grpo.rewards entry. Running the reward modules' code is why the training entry, and
    not the config check, calls this at start-up: an entry that cannot be imported stops the run before any data is
    read."""
    return [(name, import_reward(name)) for name in names]


def import_reward(name: str) -> RewardFn:
    """`package.module:function` or `path/to/file.py:function` -> the function, checked to take (prompts,
    completions) (errors name the config key grpo.rewards)."""
    module_name, _, attr = name.rpartition(":")
    module = _import_reward_file(name, Path(module_name)) if module_name.endswith(".py") else \
        _import_reward_module(name, module_name)
    if not hasattr(module, attr):
        defined = [key for key, value in vars(module).items()
                   if callable(value) and getattr(value, "__module__", None) == module.__name__]
        raise ConfigError(f"grpo.rewards: {module_name} has no function {attr!r} (from {name!r})."
                          f"{did_you_mean(attr, defined)}", key="grpo.rewards")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {module_name} has {attr!r}, but it is {reprlib.repr(fn)} "
                          f"({type(fn).__name__}), not a function (from {name!r}): name a function "
                          f"{REWARD_SIGNATURE}", key="grpo.rewards")
    check_reward_signature(name, fn)
    return fn


REWARD_SIGNATURE = "fn(prompts: list[str], completions: list[str]) -> list[float]"


def check_reward_signature(name: str, fn: RewardFn) -> None:
    """Refuse a function that cannot be called as `fn(prompts, completions)`, as `call_reward` calls it: found
    here, not after the data is read and the first completions are sampled."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-in callables have none: their first call checks them
        return
    try:
        signature.bind(["prompt"], ["completion"])
    except TypeError as error:
        code = getattr(inspect.unwrap(fn), "__code__", None)
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
        raise ConfigError(f"grpo.rewards: {name!r}{where} has the signature {signature} and cannot be called with "
                          f"the two positional lists (prompts, completions) ({error}): define it as "
                          f"{REWARD_SIGNATURE} (further parameters need default values)", key="grpo.rewards") \
            from None


def _import_reward_module(name: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if module_name != error.name and not module_name.startswith(f"{error.name}."):  # an import inside it
            raise _import_failure(name, error) from None
        raise ConfigError(f"grpo.rewards: cannot import module {module_name!r} of {name!r} ({error}). A module of "
                          "your own must be on the Python path: run with PYTHONPATH=<its directory> (the optrush "
                          "command does not search the current directory), or name its file instead, e.g. "
                          f"grpo.rewards=[path/to/{module_name.replace('.', '/')}.py:{name.rpartition(':')[2]}]",
                          key="grpo.rewards") from None
    except SyntaxError as error:
        raise _import_failure(name, error) from None
    except Exception as error:
        error.add_note(_IMPORT_NOTE.format(name=name))
        raise


def _import_reward_file(name: str, file: Path):
    if not file.is_file():
        raise ConfigError(f"grpo.rewards: {name!r} names the file {file}, which does not exist (a relative path is "
                          f"taken from the working directory, {Path.cwd()})", key="grpo.rewards")
    module_name = f"optrush_reward_file_{file.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(loaded.__file__).resolve() == file.resolve():
        return loaded  # imported at start-up, then by the objective: run the file once, as `import` runs a module
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # what `dataclasses` and `pickle` look a module's classes up in
    try:
        spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[spec.name]  # as a failed `import` leaves no module behind: the fixed file is run again
        if isinstance(error, (SyntaxError, ImportError)):
            raise _import_failure(name, error) from None
        if isinstance(error, Exception):  # not Ctrl-C
            error.add_note(_IMPORT_NOTE.format(name=name))
        raise
    return module


_IMPORT_NOTE = "(raised while importing the reward function {name!r} of grpo.rewards)"


def _import_failure(name: str, error: SyntaxError | ImportError) -> ConfigError:
    """The syntax error or failed import in a reward module's code, at its file:line, as a ConfigError."""
    if isinstance(error, SyntaxError):
        line = f" in `{error.text.strip()}`" if error.text else ""
        return ConfigError(f"grpo.rewards: {error.filename}:{error.lineno}: syntax error{line} ({error.msg}), "
                           f"found importing {name!r}: fix the syntax there", key="grpo.rewards")
    frame = _failing_frame(error)
    where = f"{frame.filename}:{frame.lineno}: `{frame.line}`" if frame else f"the import of {name!r}"
    return ConfigError(f"grpo.rewards: {where} failed ({type(error).__name__}: {error}), found importing {name!r}: "
                       "install the package that provides it in this Python environment, or fix the import",
                       key="grpo.rewards")


def _failing_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The last frame of the error's traceback in Python source (not importlib's machinery): the failing line."""
    machinery = Path(importlib.__file__).parent
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith("<") and Path(frame.filename).parent != machinery]
    return frames[-1] if frames else None


def reward_name(fn: RewardFn) -> str:
    """`module:function` of a reward function passed directly (not named in grpo.rewards)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def call_reward(fn: RewardFn, name: str, prompts: list[str], completions: list[str], *,
                group_size: int) -> torch.Tensor:
    """(N,) fp32 rewards of `fn` (named `name` in grpo.rewards), checked: one finite number per completion."""
    try:
        values = fn(prompts, completions)
    except Exception as error:
        error.add_note(f"(raised inside the reward function {name!r} of grpo.rewards)")
        raise
    n = len(completions)
    problem = reward_contract_violation(values, n)
    if problem:
        raise ValueError(f"grpo.rewards: {name!r} returned {reprlib.repr(values)} ({type(values).__name__}): "
                         f"{problem}. A reward function takes (prompts, completions), two lists of {n} strings "
                         f"({n // group_size} prompts x grpo.group_size={group_size}), and must return a list of "
                         f"{n} finite floats, one per completion")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def reward_contract_violation(values, n: int) -> str | None:
    """What is wrong with `values` as the rewards of n completions, or None."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return "not a list"
    if len(values) != n:
        return f"{len(values)} value(s) for {n} completions"
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            return f"value {i} is {value!r} ({type(value).__name__}), not a number"
        if not math.isfinite(value):
            return f"value {i} is {value}, not finite"
    return None


def prompts_of(batch: Batch) -> list[list[int]]:
    """The prompt tokens of every row: inputs up to and including the position of the first trained target."""
    prompts = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:first + 1])
    return prompts


def group_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(G*k,) rewards -> advantages normalised within each consecutive group of k."""
    groups = rewards.view(-1, k)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)).flatten()


@dataclass(kw_only=True)
class Rollout:
    """One micro-batch of sampled completions, kept to be trained on `updates_per_generation` times."""
    batch: Batch
    """Right-padded prompt + completion rows, targets on the completion tokens."""
    advantages: torch.Tensor
    """(N,) one per completion."""
    rewards: torch.Tensor
    """(N,) summed rewards, for the metrics."""
    reference: torch.Tensor | None
    """(N, T) reference token log-probs (None when kl_beta = 0)."""
    old_logps: torch.Tensor | None = None
    """(N, T) token log-probs under the sampling policy, set by the first update."""

    def state_dict(self) -> dict:
        b = self.batch
        return {"input_ids": b.input_ids.cpu(), "labels": b.labels.cpu(), "advantages": self.advantages.cpu(),
                "rewards": self.rewards, "reference": None if self.reference is None else self.reference.cpu(),
                "old_logps": None if self.old_logps is None else self.old_logps.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Rollout:
        ids, labels = state["input_ids"], state["labels"]
        lengths = (labels != IGNORE_INDEX).cumsum(dim=1).argmax(dim=1) + 1  # through the last completion token
        batch = Batch(input_ids=ids, labels=labels, position_ids=torch.arange(ids.shape[1]).expand_as(ids),
                      attention_lengths=lengths)
        return cls(batch=batch, advantages=state["advantages"], rewards=state["rewards"],
                   reference=state["reference"], old_logps=state["old_logps"])

    def to(self, device: torch.device) -> Rollout:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Rollout(batch=self.batch.to(device), advantages=move(self.advantages), rewards=self.rewards,
                       reference=move(self.reference), old_logps=move(self.old_logps))


class GRPO:
    TOTALS = ("completions", "reward", "kl", "completion_tokens", "clipped")
    """The sums `pop_metrics` averages: a fixed set, so a rank that trained nothing still sums zeros over every
    key."""

    def __init__(self, *, cfg: GRPOConfig, tokenizer, reference: nn.Module | None, seed: int = 0,
                 micro_batches: int = 1, rewards: list[RewardFn] | None = None, chunk_tokens: int | None = None):
        if cfg.kl_beta > 0 and (reference is None) != (cfg.reference == "lora_disabled"):
            raise ValueError(f"grpo.kl_beta={cfg.kl_beta} with grpo.reference={cfg.reference}: give a reference "
                             "model for `copy` and none for `lora_disabled`")
        self.cfg, self.tokenizer, self.reference = cfg, tokenizer, reference
        self.rewards: list[tuple[str, RewardFn]] = [(reward_name(fn), fn) for fn in rewards] if rewards is not None \
            else import_rewards(cfg.rewards)
        self.seed, self.micro_batches, self.chunk_tokens = seed, micro_batches, chunk_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        """Training calls so far: call c trains micro-batch slot c % micro_batches of update
        (c // micro_batches) % updates_per_generation of its generation."""
        self.rollouts: list[Rollout | None] = [None] * micro_batches
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))

    def units(self, batch: Batch) -> int:
        return batch.input_ids.shape[0] * self.cfg.group_size

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not model.training:  # evaluation: fresh samples, the training rollouts and generator untouched
            rollout = self.rollout(model, batch, generator=torch.Generator().manual_seed(self.seed))
        else:
            slot = self.calls % self.micro_batches
            if (self.calls // self.micro_batches) % self.cfg.updates_per_generation == 0:
                self.rollouts[slot] = self.rollout(model, batch, generator=self.generator)
            # (a no-op but after a resume, which restores the rollouts on the CPU)
            self.rollouts[slot] = rollout = self.rollouts[slot].to(batch.input_ids.device)
            self.calls += 1
        loss_sum, step = self.policy_loss(model, rollout)
        self.totals.update(step)
        n = step["completions"]
        # a reused rollout may hold another count of completions than the batch the loop counted units for
        return loss_sum * (self.units(batch) / n), {"reward": step["reward"] / n, "kl": step["kl"] / n,
                                                    "clip_fraction": step["clipped"] / step["completion_tokens"]}

    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: Batch, *, generator: torch.Generator) -> Rollout:
        """Sample `group_size` completions of every prompt of `batch`, score them, and take the reference's
        log-probs."""
        k, tok = self.cfg.group_size, self.tokenizer
        prompts = prompts_of(batch)
        completions = generate_batch(model, [p for p in prompts for _ in range(k)],
                                     max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=generator,
                                     stop_together=world_size() > 1)
        prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in prompts for _ in range(k)]
        completion_texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = torch.zeros(len(completions))
        for name, fn in self.rewards:
            rewards += call_reward(fn, name, prompt_texts, completion_texts, group_size=k)
        device = batch.input_ids.device
        rows = completions_batch(prompts, completions, k=k, pad_id=tok.pad_token_id, device=device)
        reference = None
        if self.cfg.kl_beta > 0:
            if self.reference is not None:
                reference = self.logps(self.reference, rows)
            else:
                with adapters_disabled(model):
                    reference = self.logps(model, rows)
        return Rollout(batch=rows, advantages=group_advantages(rewards, k).to(device), rewards=rewards,
                       reference=reference)

    def policy_loss(self, model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed per-completion loss, metric sums) of one update on `rollout`; the first update stores the
        sampling policy's log-probs in it."""
        rows = rollout.batch
        logps = self.logps(model, rows)
        if rollout.old_logps is None:
            rollout.old_logps = logps.detach()
        trained = (rows.labels != IGNORE_INDEX).float()
        advantages = rollout.advantages[:, None]
        ratio = torch.exp(logps - rollout.old_logps)
        clipped = ratio.clamp(1 - self.cfg.clip_eps, 1 + self.cfg.clip_eps)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        kl = torch.zeros_like(per_token)
        if rollout.reference is not None:
            q = rollout.reference - logps
            kl = torch.exp(q) - q - 1
            per_token = per_token + self.cfg.kl_beta * kl
        lengths = trained.sum(dim=1)
        loss_sum = ((per_token * trained).sum(dim=1) / lengths).sum()
        # the clip binds where it changes the objective: the clipped term is the smaller one
        binds = (clipped * advantages < ratio * advantages) & (trained > 0)
        return loss_sum, {"completions": len(lengths), "reward": float(rollout.rewards.sum()),
                          "kl": float(((kl.detach() * trained).sum(dim=1) / lengths).sum()),
                          "completion_tokens": float(lengths.sum()), "clipped": float(binds.sum())}

    def logps(self, model: nn.Module, rows: Batch) -> torch.Tensor:
        """(N, T) token log-probs of the completions under `model`."""
        return label_logps(model, rows.input_ids, rows.labels, chunk_tokens=self.chunk_tokens)

    def pop_metrics(self, reduce: Callable[[Counter], Mapping[str, float]] | None = None) -> dict[str, float]:
        """Mean reward, KL to the reference, completion length and the share of tokens whose ratio the clip
        bound, since the last call; `reduce` (the loop's `sum_over_ranks`) sums the totals over all ranks first."""
        totals = reduce(self.totals) if reduce else self.totals
        self.totals = Counter(dict.fromkeys(self.TOTALS, 0))
        n = totals["completions"]
        if not n:
            return {}
        return {"reward": totals["reward"] / n, "kl": totals["kl"] / n,
                "completion_tokens": totals["completion_tokens"] / n,
                "clip_fraction": totals["clipped"] / totals["completion_tokens"]}

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume: the call count, the sampling generator and the
        rollouts still to be reused."""
        return {"calls": self.calls, "generator": self.generator.get_state(),
                "rollouts": [None if r is None else r.state_dict() for r in self.rollouts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["rollouts"]) != self.micro_batches:
            raise ValueError(f"the checkpoint's GRPO state has {len(state['rollouts'])} micro-batch slots, this run "
                             f"train.grad_accum={self.micro_batches}: resume with the same train.grad_accum")
        self.calls = state["calls"]
        self.generator.set_state(state["generator"])
        self.rollouts = [None if r is None else Rollout.from_state_dict(r) for r in state["rollouts"]]


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
