"""Preference pairs (prompt, chosen, rejected) for reward models and the DPO family, packed pair by pair.

    train, evals, report = build_preference_datasets(cfg.data, tokenizer, seed=0)
    loader = PairLoader(train, strategy="bfd", rows=4, max_length=1024, pad_id=tok.pad_token_id, seed=0)
    write_jsonl(recipe_preference_pairs(generate_recipes(200, seed=0), seed=0), "pairs.jsonl")  # synthetic pairs
    pairs = next(loader)            # a PairBatch; pairs.batch is an ordinary packed `Batch`

A record holds a prompt and two completions (`data.prompt_column`, `data.chosen_column`, `data.rejected_column`).
Each side is encoded like a prompt/completion example, except that the EOS stays an *input* token as well:
`input_ids = [bos] + prompt + completion + [eos]`, `labels[t]` the next token, masked on prompt targets and after
the EOS. The summed log-prob of a completion is then exactly the SFT target sum, and a reward head reads the
hidden state at the EOS, the one position that has seen the whole text.

Packing: a pair is the unit and is never split. `optrush.data.pack.plan_batches` plans over pair lengths, so
`none` puts one pair per row (padded to the longest pair of the micro-batch) and `bfd` packs many pairs per row
of `max_length` tokens. Either way chosen and rejected are separate documents of their row (document-causal
attention, positions restarting at 0), and `sequence_ids` number the micro-batch's 2P sequences: 2p is pair p's
chosen, 2p + 1 its rejected completion. A pair longer than `max_length` is dropped (or an error with
`data.too_long=error`): truncating would cut the EOS the reward head reads.

Shared-prompt packing (`shared_prompt=True`, data.shared_prompt): a pair is laid out as
`[shared prefix][chosen branch][rejected branch]` in one document. The prefix is BOS + the prompt but its last
token (whose target is already a completion token, so each branch starts with it); branch positions continue
from the prefix, and `branch_ids` let `optrush.objectives.dpo.shared_prompt_mask` hide the chosen branch from the
rejected one. Log-probs and rewards equal those of separate sequences (tests/test_objectives_dpo.py).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.dataset import split_off, tokenize
from optrush.data.formats import Example, special_ids
from optrush.data.loader import BatchLoader
from optrush.data.reader import DataError, read_records
from optrush.data.recipes import recipe_completion, recipe_prompt


@dataclass(slots=True)
class PreferencePair:
    chosen: Example
    rejected: Example
    index: int = 0
    """Position in (train + eval) pairs; keys the cached reference log-probs."""
    shared: int = 0
    """Leading positions both sequences have in common (BOS and the prompt but its last token: the target there
    is already a completion token); shared-prompt packing stores them once."""

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def shared_length(self) -> int:
        """Positions the pair takes with its prompt stored once."""
        return len(self) - self.shared


@dataclass
class PreferenceReport:
    path: str
    records: int
    train_pairs: int
    eval_pairs: int
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0

    def format(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"data: {self.records} preference records from {self.path} -> {self.train_pairs} train + "
                f"{self.eval_pairs} eval pairs (dropped: {dropped}); {self.tokens:,} train tokens")

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "train_pairs": self.train_pairs,
                "eval_pairs": self.eval_pairs, "dropped": dict(self.dropped), "tokens": self.tokens}


def encode_sequence(prompt_ids: list[int], completion_ids: list[int], *, bos_id: int | None,
                    eos_id: int) -> Example:
    """`[bos] + prompt + completion + [eos]` as inputs; targets on the completion and the EOS only."""
    sequence = ([bos_id] if bos_id is not None else []) + prompt_ids + completion_ids + [eos_id]
    masked = max(0, len(sequence) - len(completion_ids) - 2)  # positions whose target is still a prompt token
    return Example(input_ids=sequence, labels=[IGNORE_INDEX] * masked + sequence[masked + 1:] + [IGNORE_INDEX])


def read_pairs(path: str, *, cfg: DataConfig, tokenizer, report: PreferenceReport) -> list[PreferencePair]:
    bos_id, eos_id = special_ids(tokenizer)
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    numbered = list(read_records(path))
    report.records += len(numbered)
    texts = []
    for number, record in numbered:
        for column in columns:
            if not isinstance(record.get(column), str):
                found = ", ".join(repr(c) for c in record) or "none"
                raise DataError(f"{path}:{number}: a preference record needs string columns {columns} (set "
                                f"data.prompt_column, data.chosen_column, data.rejected_column); column {column!r} "
                                f"is missing or not a string (columns found: {found})")
        texts.append([record[column] for column in columns])
    prompts, chosen, rejected = (tokenize([t[i] for t in texts], tokenizer) for i in range(3))
    pairs = []
    for (number, _), p, c, r in zip(numbered, prompts, chosen, rejected):
        pair = PreferencePair(chosen=encode_sequence(p, c, bos_id=bos_id, eos_id=eos_id),
                              rejected=encode_sequence(p, r, bos_id=bos_id, eos_id=eos_id),
                              shared=max(0, len(p) + (bos_id is not None) - 1))
        if len(pair) > cfg.max_length:
            if cfg.too_long == "error":
                raise DataError(f"{path}:{number}: the pair takes {len(pair)} tokens (chosen + rejected) > "
                                f"data.max_length={cfg.max_length}; raise data.max_length or set data.too_long=drop")
            report.dropped["too_long"] += 1
            continue
        pairs.append(pair)
    return pairs


def build_preference_datasets(cfg: DataConfig, tokenizer, *,
                              seed: int) -> tuple[list[PreferencePair], list[PreferencePair], PreferenceReport]:
    """(train pairs, eval pairs, report); eval from `data.eval_path` or `data.eval_fraction` as for SFT data."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the preference data (a JSONL file), e.g. data.path=pairs.jsonl")
    report = PreferenceReport(path=str(cfg.path), records=0, train_pairs=0, eval_pairs=0)
    train = read_pairs(cfg.path, cfg=cfg, tokenizer=tokenizer, report=report)
    if not train:  # before the eval split, which would otherwise blame data.eval_fraction
        too_long = report.dropped["too_long"]
        why = (f"all {too_long} pairs are longer than data.max_length={cfg.max_length} (chosen + rejected): raise "
               "data.max_length" if too_long else "check the file")
        raise DataError(f"no training pairs left from {cfg.path}: read {report.records} records; {why}")
    if cfg.eval_path is not None:
        evals = read_pairs(cfg.eval_path, cfg=cfg, tokenizer=tokenizer, report=report)
    elif cfg.eval_fraction > 0:
        train, evals = split_off(train, fraction=cfg.eval_fraction, seed=seed)
    else:
        evals = []
    for i, pair in enumerate(train + evals):
        pair.index = i
    report.train_pairs, report.eval_pairs = len(train), len(evals)
    report.tokens = sum(len(pair) for pair in train)
    return train, evals, report


@dataclass(slots=True)
class PairBatch:
    batch: Batch
    """The chosen and rejected sequences as packed documents (document_ids always set)."""
    sequence_ids: torch.Tensor
    """(B, T) int64: 2p on pair p's chosen tokens, 2p + 1 on its rejected tokens, -1 on padding."""
    last_positions: torch.Tensor
    """(2P,) int64 flat index into B * T of each sequence's last token (its EOS)."""
    pair_index: torch.Tensor
    """(P,) int64 dataset index of each pair (`PreferencePair.index`)."""
    branch_ids: torch.Tensor | None = None
    """Shared-prompt packing only: (B, T) int64, 0 on a pair's shared prompt, 1 on its chosen and 2 on its rejected
    branch, -1 on padding; `document_ids` then number pairs, not sequences (see `shared_prompt_mask`)."""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_index)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    @property
    def num_padding(self) -> int:
        return self.batch.num_padding

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(batch=self.batch.to(device, non_blocking), sequence_ids=self.sequence_ids.to(device),
                         last_positions=self.last_positions.to(device), pair_index=self.pair_index.to(device),
                         branch_ids=None if self.branch_ids is None else self.branch_ids.to(device))


def collate_pairs(rows: list[list[PreferencePair]], *, packed: bool, pad_id: int, max_length: int,
                  shared_prompt: bool = False) -> PairBatch:
    """Rows of pairs -> a PairBatch: rows of `max_length` when packed, else padded to the longest row.
    `shared_prompt`: each pair is laid out as [shared prompt][chosen branch][rejected branch], both branches with
    positions continuing from the prompt (attention per `shared_prompt_mask`)."""
    lengths = [sum(pair.shared_length if shared_prompt else len(pair) for pair in row) for row in rows]
    if max(lengths) > max_length:
        raise ValueError(f"a row holds {max(lengths)} tokens > max_length={max_length}")
    width = max_length if packed else max(lengths)
    input_ids, labels, positions, documents, sequences, branches, last, index = [], [], [], [], [], [], [], []
    for r, row in enumerate(rows):
        ids, lab, pos, doc, seq, branch = [], [], [], [], [], []
        for k, pair in enumerate(row):
            start = pair.shared if shared_prompt else 0
            if shared_prompt:  # the common prefix once; its targets are prompt tokens, never trained
                ids += pair.chosen.input_ids[:start]
                lab += [IGNORE_INDEX] * start
                pos += range(start)
                doc += [k] * start
                seq += [-1] * start
                branch += [0] * start
            for side, example in enumerate((pair.chosen, pair.rejected)):
                n = len(example) - start
                doc += [k if shared_prompt else 2 * k + side] * n
                seq += [2 * len(index) + side] * n
                branch += [1 + side] * n
                ids += example.input_ids[start:]
                lab += example.labels[start:]
                pos += range(start, len(example))
                last.append(r * width + len(ids) - 1)
            index.append(pair.index)
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + [0] * pad)
        documents.append(doc + [-1] * pad)
        sequences.append(seq + [-1] * pad)
        branches.append(branch + [-1] * pad)
    batch = Batch(input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                  position_ids=torch.tensor(positions), document_ids=torch.tensor(documents, dtype=torch.int32))
    return PairBatch(batch=batch, sequence_ids=torch.tensor(sequences), last_positions=torch.tensor(last),
                     pair_index=torch.tensor(index), branch_ids=torch.tensor(branches) if shared_prompt else None)


class PairLoader(BatchLoader):
    """`BatchLoader` (same planning, resumable state and rank sharding) over pairs, yielding `PairBatch`es."""

    def __init__(self, pairs: list[PreferencePair], *, shared_prompt: bool = False, **settings):
        self.shared_prompt = shared_prompt  # read by plan_epoch, which the base __init__ calls
        super().__init__(pairs, **{**settings, "pin_memory": False})

    def plan_epoch(self, epoch: int) -> list[list[list[int]]]:
        if self.shared_prompt:  # plan by the positions a pair really takes
            self.lengths = [pair.shared_length for pair in self.examples]
        return super().plan_epoch(epoch)

    def __next__(self) -> PairBatch:
        if self.batch_index == len(self.plan):
            self.epoch, self.batch_index = self.epoch + 1, 0
            if self.shuffle:
                self.plan = self.plan_epoch(self.epoch)
        rows = self.plan[self.batch_index]
        self.batch_index += 1
        return collate_pairs([[self.examples[i] for i in row] for row in rows], packed=self.strategy == "bfd",
                             pad_id=self.pad_id, max_length=self.max_length, shared_prompt=self.shared_prompt)


def recipe_preference_pairs(records, *, seed: int) -> list[dict]:
    """Synthetic preference records from recipes (optrush.data.recipes): the real completion is chosen; the
    rejected one lost its ingredient list and has its direction steps in shuffled order, each with its words
    shuffled (easy to rank: a smoke test of the objectives, not a benchmark)."""
    rng = random.Random(seed)
    pairs = []
    for record in records:
        steps = [" ".join(rng.sample(step.split(), len(step.split()))) for step in record["directions"]]
        rng.shuffle(steps)
        corrupted = {**record, "ingredients": [], "directions": steps}
        pairs.append({"prompt": recipe_prompt(record), "chosen": recipe_completion(record),
                      "rejected": recipe_completion(corrupted)})
    return pairs
