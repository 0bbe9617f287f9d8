"""Training and evaluation examples from the data files named by a `DataConfig`, with a report of what happened.

    train, evals, report = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    print(report.format())

Reads `data.path` (JSONL or a JSON array, see `optrush.data.reader`), turns every record into an `Example`
(`optrush.data.formats`, tokenized in chunks with the fast tokenizer's batch call), applies `data.too_long` to
examples longer than `data.max_length` (truncate / drop / error; always counted), then takes the evaluation
examples from `data.eval_path`, or holds out `data.eval_fraction` of the training examples (chosen by `seed`, so
the split is the same on every run and every rank). Raises `DataError` when no training example is left.

Each stage is a function over an iterator of records, so a tokenize-once disk cache or a process pool can wrap
`encode_file` later without changing callers.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from optrush.config.schema import DataConfig
from optrush.data.formats import Example, build_example, render, special_ids
from optrush.data.reader import DataError, is_json_array, read_json, read_jsonl

CHUNK_RECORDS = 1024


@dataclass
class Tally:
    """Counts for one data file."""
    path: str
    records: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Reason -> examples dropped: `too_long` (data.too_long=drop), `empty` (no tokens at all),
    `no_trained_tokens` (truncation left only prompt tokens)."""
    truncated: int = 0


@dataclass
class DataReport:
    train: Tally
    eval: Tally | None
    train_examples: int
    eval_examples: int
    max_length: int
    too_long: str
    tokens: int
    """Model positions (input tokens) over all training examples."""
    trained_tokens: int
    """Targets that carry loss over all training examples."""

    def format(self) -> str:
        evals = f" + {self.eval_examples} eval" if self.eval_examples else ""
        lines = [f"data: {self.train.records} records from {self.train.path} -> {self.train_examples} train"
                 f"{evals} examples"]
        if self.eval is not None:
            lines.append(f"  eval: {self.eval.records} records from {self.eval.path}")
        for tally in (self.train, self.eval):
            if tally is not None and (tally.dropped or tally.truncated):
                dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(tally.dropped.items())) or "none"
                lines.append(f"  {tally.path}: dropped {dropped}; truncated {tally.truncated} "
                             f"(data.too_long={self.too_long}, data.max_length={self.max_length})")
        share = self.trained_tokens / max(self.tokens, 1)
        lines.append(f"  train tokens: {self.tokens:,} positions, {self.trained_tokens:,} trained ({share:.1%})")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        def tally(t: Tally | None) -> dict | None:
            return None if t is None else {"path": t.path, "records": t.records, "dropped": dict(t.dropped),
                                           "truncated": t.truncated}

        return {"train": tally(self.train), "eval": tally(self.eval), "train_examples": self.train_examples,
                "eval_examples": self.eval_examples, "tokens": self.tokens, "trained_tokens": self.trained_tokens}


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int) -> tuple[list[Example], list[Example], DataReport]:
    """(train examples, eval examples, report); see the module docstring."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the training data (a JSONL file), e.g. data.path=train.jsonl")
    train_tally = Tally(path=str(cfg.path))
    train = list(encode_file(cfg.path, cfg=cfg, tokenizer=tokenizer, tally=train_tally))
    eval_tally = None
    if cfg.eval_path is not None:
        eval_tally = Tally(path=str(cfg.eval_path))
        evals = list(encode_file(cfg.eval_path, cfg=cfg, tokenizer=tokenizer, tally=eval_tally))
    elif cfg.eval_fraction > 0:
        train, evals = split_off(train, fraction=cfg.eval_fraction, seed=seed)
    else:
        evals = []
    if not train:
        dropped = ", ".join(f"{reason} {count}" for reason, count in train_tally.dropped.items()) or "none"
        raise DataError(f"no training examples left from {cfg.path}: read {train_tally.records} records, dropped "
                        f"{dropped}, held out {len(evals)} for eval; check the file, data.format, data.max_length "
                        "(or data.too_long=truncate) and data.eval_fraction")
    report = DataReport(train=train_tally, eval=eval_tally, train_examples=len(train), eval_examples=len(evals),
                        max_length=cfg.max_length, too_long=cfg.too_long, tokens=sum(len(e) for e in train),
                        trained_tokens=sum(e.num_trained for e in train))
    return train, evals, report


def encode_file(path: str | Path, *, cfg: DataConfig, tokenizer, tally: Tally) -> Iterator[Example]:
    """Stream the examples of one data file, counting records, drops and truncations into `tally`."""
    array = is_json_array(path)
    numbered = read_json(path) if array else read_jsonl(path)
    place = "{path} item {number}" if array else "{path}:{number}"
    bos_id, eos_id = special_ids(tokenizer)
    while chunk := list(islice(numbered, CHUNK_RECORDS)):
        tally.records += len(chunk)
        wheres = [place.format(path=path, number=number) for number, _ in chunk]
        texts = [render(record, cfg=cfg, where=where) for (_, record), where in zip(chunk, wheres)]
        prompts = tokenize([prompt for prompt, _ in texts], tokenizer)
        completions = tokenize([completion for _, completion in texts], tokenizer)
        for where, prompt_ids, completion_ids in zip(wheres, prompts, completions):
            example = build_example(prompt_ids, completion_ids, bos_id=bos_id, eos_id=eos_id)
            example = fit_length(example, cfg=cfg, where=where, tally=tally)
            if example is not None:
                yield example


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, no special tokens; one batched call (the fast tokenizer parallelises it)."""
    if not any(texts):
        return [[] for _ in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def fit_length(example: Example, *, cfg: DataConfig, where: str, tally: Tally) -> Example | None:
    """Apply `data.too_long` (and drop examples with no tokens); None means dropped, counted in `tally`."""
    if not example.input_ids:
        tally.dropped["empty"] += 1
        return None
    if len(example) <= cfg.max_length:
        return example
    if cfg.too_long == "error":
        raise DataError(f"{where}: {len(example)} tokens > data.max_length={cfg.max_length}; raise data.max_length, "
                        "or set data.too_long=truncate or data.too_long=drop")
    if cfg.too_long == "drop":
        tally.dropped["too_long"] += 1
        return None
    cut = Example(input_ids=example.input_ids[:cfg.max_length], labels=example.labels[:cfg.max_length])
    if cut.num_trained == 0:
        tally.dropped["no_trained_tokens"] += 1
        return None
    tally.truncated += 1
    return cut


def split_off(examples: list[Example], *, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held out): round(fraction * n) examples (at least one) chosen by `seed`; both keep file order."""
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} of {len(examples)} examples leaves none to train on; use a "
                        "smaller fraction or more data")
    held = np.zeros(len(examples), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(examples))[:n_eval]] = True
    return ([e for e, h in zip(examples, held.tolist()) if not h], [e for e, h in zip(examples, held.tolist()) if h])
