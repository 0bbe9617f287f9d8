"""Preference pairs (prompt, chosen, rejected) for reward models and the DPO family, packed pair by pair.

    train, evals, report = build_preference_datasets(cfg.data, tokenizer, seed=0)
    loader = PairLoader(train, strategy="bfd", rows=4, max_length=1024, pad_id=tok.pad_token_id, seed=0)
    write_jsonl(recipe_preference_pairs(generate_recipes(200, seed=0), seed=0), "pairs.jsonl")  # synthetic pairs
    pairs = next(loader)            # a PairBatch; pairs.batch is an ordinary packed `Batch`

A record holds a prompt and two completions (`data.prompt_column`, `data.chosen_column`, `data.rejected_column`),
from any source `optrush.data.sources` reads. A record without them, or with an empty completion, is a malformed
row (`data.on_error`: an error naming file and line, or skipped into the rejects file, as in `optrush.data.dataset`);
a pair whose completions encode alike has no gradient and is dropped and counted (`identical`).
Each side is encoded like a prompt/completion example, except that the EOS stays an *input* token as well:
`input_ids = [bos] + prompt + completion + [eos]`, `labels[t]` the next token, masked on prompt targets and after
the EOS. The summed log-prob of a completion is then exactly the SFT target sum, and a reward head reads the
hidden state at the EOS, the one position that has seen the whole text.

Cleaning: the `data.clean` rules (`optrush.data.clean`, in their order) judge the training pairs before they are
encoded, each drop counted under its rule (`pair_rules`): drop_patterns, charset, nonempty (of the three pair
columns), dedup and near_dedup read the pair's three texts, so duplicates are equal (prompt, chosen, rejected)
triples; min/max_chars and min/max_tokens bound each side of the pair on its own, as the prompt + completion
example it is encoded like. The list-column rules (items, rare vocabulary) are refused: a pair has no list.
Pairs are tokenized over `data.num_proc` processes and cached in `data.cache_dir` as SFT examples are (a pair as
its chosen and rejected sequences).

Packing: a pair is the unit and is never split. `optrush.data.pack.plan_batches` plans over pair lengths, so
`none` puts one pair per row (padded to the longest pair of the micro-batch) and `bfd` packs many pairs per row
of `max_length` tokens. Either way chosen and rejected are separate documents of their row (document-causal
attention, positions restarting at 0), and `sequence_ids` number the micro-batch's 2P sequences: 2p is pair p's
chosen, 2p + 1 its rejected completion. A pair longer than `max_length` as packed (under `shared_prompt`, its
prompt counted once) is dropped (or an error with `data.too_long=error`): truncating would cut the EOS the reward
head reads.

Shared-prompt packing (`shared_prompt=True`, data.shared_prompt): a pair is laid out as
`[shared prefix][chosen branch][rejected branch]` in one document. The prefix is BOS + the prompt but its last
token (whose target is already a completion token, so each branch starts with it); branch positions continue
from the prefix, and `branch_ids` let `optrush.objectives.dpo.shared_prompt_mask` hide the chosen branch from the
rejected one. Log-probs and rewards equal those of separate sequences (tests/test_objectives_dpo.py).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from operator import itemgetter

import numpy as np
import torch

from optrush.config.checks import preference_clean_problems
from optrush.config.errors import ConfigError
from optrush.config.schema import DataConfig
from optrush.data import cache
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.clean import Cleaner, Rule, rules_from_config
from optrush.data.dataset import Tally, collect_rejects, eval_rejects_path, first_bad_row_error, parallel_chunks, \
    read_source, render_each, split_off, tokenize
from optrush.data.examples import Examples
from optrush.data.formats import Example, special_ids
from optrush.data.loader import BatchLoader
from optrush.data.reader import DataError
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

    def positions(self, shared_prompt: bool) -> int:
        """Positions the pair takes in a row: with its prompt stored once (`shared_prompt`) or twice."""
        return self.shared_length if shared_prompt else len(self)


@dataclass
class PreferenceReport:
    """Counts per data file (`Tally`: records, pairs dropped by reason, malformed rows skipped) and the result."""
    train: Tally
    eval: Tally | None = None
    train_pairs: int = 0
    eval_pairs: int = 0
    tokens: int = 0
    """Positions (input tokens) over all training pairs, as packed (data.shared_prompt: the prompt once)."""

    def format(self) -> str:
        lines = [f"data: {self.train.records} preference records from {self.train.path} -> {self.train_pairs} "
                 f"train + {self.eval_pairs} eval pairs; {self.tokens:,} train tokens"]
        if self.eval is not None:
            lines.append(f"  eval: {self.eval.records} records from {self.eval.path}")
        for tally in filter(None, (self.train, self.eval)):
            if tally.cache is not None:
                how = "loaded from" if tally.cache == "hit" else "saved to"
                lines.append(f"  {tally.path}: tokenized pairs {how} the cache (data.cache_dir)")
            if tally.rejected:
                lines.append(f"  {tally.path}: {tally.skipped()}")
            if tally.dropped:
                dropped = ", ".join(f"{count} as {reason} ({PAIR_DROPS[reason]})"
                                    for reason, count in sorted(tally.dropped.items()))
                lines.append(f"  {tally.path}: dropped {dropped}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"train": self.train.as_dict(), "eval": None if self.eval is None else self.eval.as_dict(),
                "train_pairs": self.train_pairs, "eval_pairs": self.eval_pairs, "tokens": self.tokens}


CLEAN_DROPS = {"pattern": ("data.clean.drop_patterns", "a text matches one"),
               "charset": ("data.clean.charset", "a text holds a character outside it"),
               "empty": ("data.clean.nonempty", "a listed column is blank"),
               "chars": ("data.clean.min_chars/max_chars", "the prompt + chosen or + rejected text is out of bounds"),
               "tokens": ("data.clean.min_tokens/max_tokens", "the prompt + chosen or + rejected tokens are out of "
                                                                "bounds"),
               "duplicate": ("data.clean.dedup", "the same prompt, chosen and rejected as an earlier pair"),
               "near_duplicate": ("data.clean.near_dedup", "nearly the same texts as an earlier pair")}
"""The data.clean rules (by `Rule.name`) that drop pairs: (config key, what the pair had)."""

PAIR_DROPS = {"too_long": "longer than data.max_length; a pair is never cut",
              "identical": "chosen and rejected encode alike: nothing to learn",
              **{reason: f"{key}: {what}" for reason, (key, what) in CLEAN_DROPS.items()}}
"""Why pairs are dropped (counted in `Tally.dropped`)."""


def encode_sequence(prompt_ids: list[int], completion_ids: list[int], *, bos_id: int | None,
                    eos_id: int) -> Example:
    """`[bos] + prompt + completion + [eos]` as inputs; targets on the completion and the EOS only."""
    sequence = ([bos_id] if bos_id is not None else []) + prompt_ids + completion_ids + [eos_id]
    masked = max(0, len(sequence) - len(completion_ids) - 2)  # positions whose target is still a prompt token
    return Example(input_ids=sequence, labels=[IGNORE_INDEX] * masked + sequence[masked + 1:] + [IGNORE_INDEX])


def pair_texts(record: dict, *, cfg: DataConfig, where: str) -> list[str]:
    """[prompt, chosen, rejected] of a record. A missing or non-string column, or an empty completion (a pair needs
    two answers to compare; an empty one is almost always a broken record), is a DataError naming `where`."""
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    for column in columns:
        if not isinstance(record.get(column), str):
            found = ", ".join(repr(c) for c in record) or "none"
            raise DataError(f"{where}: a preference record needs string columns {columns} (set "
                            f"data.prompt_column, data.chosen_column, data.rejected_column); column {column!r} "
                            f"is missing or not a string (columns found: {found})")
    for column in columns[1:]:
        if not record[column].strip():
            raise DataError(f"{where}: column {column!r} is empty: a pair needs two completions to compare; fix "
                            "the record or remove it")
    return [record[column] for column in columns]


def read_pairs(path: str, *, cfg: DataConfig, tokenizer, tally: Tally, rejects_path: str | None,
               rules: Sequence[Rule] = ()) -> list[PreferencePair]:
    """The pairs of the source at `path` (any format `optrush.data.sources` reads), counted into `tally`. A record
    that is not a pair raises DataError, or under data.on_error=skip is written to the rejects file; the cleaning
    `rules` (`pair_rules`) drop pairs next, then pairs longer than data.max_length (as packed) and pairs whose
    completions encode alike. Every drop is counted in `tally.dropped` under its reason. With data.cache_dir the
    pairs (and the counts) come from the tokenize-once cache when its key matches (`optrush.data.cache`)."""
    key = cache.cache_key(path, cfg=cfg, tokenizer=tokenizer) if cfg.cache_dir is not None else None
    if key is not None and (hit := cache.load(cfg.cache_dir, key)) is not None:
        sequences, meta = hit
        tally.restore(meta["tally"])
        return pairs_of(sequences)
    pairs = encode_source_pairs(path, cfg=cfg, tokenizer=tokenizer, tally=tally, rejects_path=rejects_path,
                                rules=rules)
    if key is not None:
        sequences = Examples.from_examples(side for pair in pairs for side in (pair.chosen, pair.rejected))
        cache.save(cfg.cache_dir, key, sequences, {"tally": tally.saved()})
        tally.cache = "written"
    return pairs


def pairs_of(sequences: Examples) -> list[PreferencePair]:
    """The pairs stored as chosen, rejected, chosen, ... sequences. A pair's shared positions are the chosen side's
    leading unlabelled ones (`encode_sequence` labels from the first completion token on)."""
    pairs = []
    for i in range(0, len(sequences), 2):
        chosen = sequences[i]
        shared = int(np.argmax(np.asarray(chosen.labels) != IGNORE_INDEX))
        pairs.append(PreferencePair(chosen=chosen, rejected=sequences[i + 1], shared=shared))
    return pairs


def encode_source_pairs(path: str, *, cfg: DataConfig, tokenizer, tally: Tally, rejects_path: str | None,
                        rules: Sequence[Rule]) -> list[PreferencePair]:
    """`read_pairs` without the cache: read, clean and encode the source at `path`."""
    render_one = partial(pair_texts, cfg=cfg)
    with collect_rejects(path, cfg=cfg, tally=tally, rejects_path=rejects_path) as rejects:
        try:  # read and render together, so the first bad row in file order is the one reported
            wheres, texts = render_each(counted(read_source(path, cfg=cfg, rejects=rejects), tally), render_one,
                                        rejects=rejects)
        except DataError as err:
            if rejects is not None:
                raise
            raise first_bad_row_error(path, err, cfg=cfg, render_one=render_one) from None
    rendered = clean_pairs(list(zip(wheres, texts)), cfg=cfg, rules=rules, tally=tally)
    encode = partial(encode_pairs, cfg=cfg, tokenizer=tokenizer)
    if cfg.num_proc > 1:
        parts = parallel_chunks(rendered, encode, num_proc=cfg.num_proc, tally=tally, rejects=None)
        return [pair for part in parts for pair in part]
    return encode(rendered, tally=tally)


def counted(numbered: Iterable, tally: Tally) -> Iterator:
    """The items of `numbered`, each counted into `tally.records` as it is read."""
    for item in numbered:
        tally.records += 1
        yield item


def pair_rules(cfg: DataConfig, tokenizer) -> list[Rule]:
    """The data.clean rules (`rules_from_config`, in its order) as they judge a pair record {prompt, chosen,
    rejected} (`clean_pairs`): the text rules read all three texts; the chars and tokens bounds judge each side on
    its own (`EachSide`). The rules a pair cannot take are refused (`preference_clean_problems`)."""
    if problems := preference_clean_problems(cfg):
        raise ConfigError("invalid configuration for data.format=preference:\n  - " + "\n  - ".join(problems),
                          key="data.clean")
    side_cfg = replace(cfg, format="prompt_completion", prompt_column="prompt", completion_column="completion")
    return [EachSide(rule, cfg=cfg) if rule.name in ("chars", "tokens") else rule
            for rule in rules_from_config(side_cfg, tokenizer)]


class EachSide:
    """A data.clean rule judging the chosen and the rejected side of a pair record each, as the prompt/completion
    example the side is encoded like ({"prompt", "completion"}); the pair goes when either side fails. Side s of
    the pair at stream position i is position 2i + s for the rule, so a rule that fits (token counts) works too."""

    def __init__(self, rule: Rule, *, cfg: DataConfig):
        self.rule, self.name, self.needs_fit = rule, rule.name, rule.needs_fit
        self.prompt_column, self.completion_columns = cfg.prompt_column, (cfg.chosen_column, cfg.rejected_column)

    def sides(self, index: int, record: dict) -> list[tuple[int, str, dict]]:
        return [(2 * index + s, column, {"prompt": record[self.prompt_column], "completion": record[column]})
                for s, column in enumerate(self.completion_columns)]

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        self.rule.fit((i, side) for index, record in records for i, _, side in self.sides(index, record))

    def reject(self, index: int, record: dict) -> str | None:
        for i, column, side in self.sides(index, record):
            if (reason := self.rule.reject(i, side)) is not None:
                return f"{column}: {reason}"
        return None


def clean_pairs(rendered: list[tuple[str, list[str]]], *, cfg: DataConfig, rules: Sequence[Rule],
                tally: Tally) -> list[tuple[str, list[str]]]:
    """The (where, [prompt, chosen, rejected]) items that pass the `rules`, in order; each dropped pair is counted in
    `tally.dropped` under the first rule that rejected it."""
    if not rules:
        return rendered
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    records = [dict(zip(columns, texts)) for _, texts in rendered]
    cleaner = Cleaner(rules)
    cleaner.fit(lambda: records)
    kept = [item for item, _ in cleaner.filter(zip(rendered, records), record=itemgetter(1))]
    tally.dropped.update({reason: count for reason, count in cleaner.report().dropped.items() if count})
    return kept


def encode_pairs(rendered: list[tuple[str, list[str]]], *, cfg: DataConfig, tokenizer,
                 tally: Tally) -> list[PreferencePair]:
    """The pairs of (where, [prompt, chosen, rejected]) items, tokenized in one batched call per column; pairs
    whose completions encode alike, or longer than data.max_length (data.too_long=error: a DataError naming
    `where`), are dropped and counted in `tally`."""
    bos_id, eos_id = special_ids(tokenizer)
    prompts, chosen, rejected = (tokenize([texts[i] for _, texts in rendered], tokenizer) for i in range(3))
    pairs = []
    for (where, _), p, c, r in zip(rendered, prompts, chosen, rejected):
        if c == r:  # equal log-probs on both sides: the pair's loss has no gradient
            tally.dropped["identical"] += 1
            continue
        pair = PreferencePair(chosen=encode_sequence(p, c, bos_id=bos_id, eos_id=eos_id),
                              rejected=encode_sequence(p, r, bos_id=bos_id, eos_id=eos_id),
                              shared=max(0, len(p) + (bos_id is not None) - 1))
        if (length := pair.positions(cfg.shared_prompt)) > cfg.max_length:
            if cfg.too_long == "error":
                raise DataError(f"{where}: the pair takes {length} tokens ({pair_layout(cfg)}) > "
                                f"data.max_length={cfg.max_length}; raise data.max_length or set data.too_long=drop")
            tally.dropped["too_long"] += 1
            continue
        pairs.append(pair)
    return pairs


def pair_layout(cfg: DataConfig) -> str:
    return "prompt once + chosen + rejected" if cfg.shared_prompt else "chosen + rejected"


def build_preference_datasets(cfg: DataConfig, tokenizer, *, seed: int, purpose: str = "training"
                              ) -> tuple[list[PreferencePair], list[PreferencePair], PreferenceReport]:
    """(train pairs, eval pairs, report); eval from `data.eval_path` or `data.eval_fraction` as for SFT data.
    `purpose`: what the caller reads data.path for (`training`, `evaluation`), as the error says it when no pair is
    left."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the preference data (a JSONL file), e.g. data.path=pairs.jsonl")
    rules = pair_rules(cfg, tokenizer)  # before reading: a rule a pair cannot take is a config error
    report = PreferenceReport(train=Tally(path=str(cfg.path)))
    train = read_pairs(cfg.path, cfg=cfg, tokenizer=tokenizer, tally=report.train, rejects_path=cfg.rejects_path,
                       rules=rules)
    if not train:  # before the eval split, which would otherwise blame data.eval_fraction
        raise DataError(no_pairs_message(cfg, report.train, purpose=purpose))
    if cfg.eval_path is not None:
        report.eval = Tally(path=str(cfg.eval_path))
        evals = read_pairs(cfg.eval_path, cfg=cfg, tokenizer=tokenizer, tally=report.eval,
                           rejects_path=eval_rejects_path(cfg))
    elif cfg.eval_fraction > 0:
        train, evals = split_off(train, fraction=cfg.eval_fraction, seed=seed)
    else:
        evals = []
    for i, pair in enumerate(train + evals):
        pair.index = i
    report.train_pairs, report.eval_pairs = len(train), len(evals)
    report.tokens = sum(pair.positions(cfg.shared_prompt) for pair in train)
    return train, evals, report


def no_pairs_message(cfg: DataConfig, tally: Tally, *, purpose: str) -> str:
    """Why a data file gave no pair: the drop counts, largest first, each with what to change."""
    advice = {"too_long": f"are longer than data.max_length={cfg.max_length} ({pair_layout(cfg)}): raise "
                          "data.max_length",
              "identical": "have chosen and rejected completions that encode alike (nothing to learn): check "
                           "data.chosen_column and data.rejected_column",
              **{reason: f"were dropped by {key} ({what}): loosen or unset it"
                 for reason, (key, what) in CLEAN_DROPS.items()}}
    causes = [f"{'all ' if count == tally.records else ''}{count} pairs {advice[reason]}"
              for reason, count in tally.dropped.most_common()]
    causes += tally.unread()
    return f"no {purpose} pairs left from {cfg.path}: read {tally.records} records; " + "; ".join(causes)


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
    lengths = [sum(pair.positions(shared_prompt) for pair in row) for row in rows]
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


def pair_lengths(pairs: Sequence[PreferencePair], *, shared_prompt: bool) -> np.ndarray:
    """int64 positions each pair takes in a row, what `PairLoader` plans by (`optrush.data.stats` reports them)."""
    return np.fromiter((pair.positions(shared_prompt) for pair in pairs), dtype=np.int64, count=len(pairs))


class PairLoader(BatchLoader):
    """`BatchLoader` (same planning, resumable state and rank sharding) over pairs, yielding `PairBatch`es."""

    def __init__(self, pairs: list[PreferencePair], *, shared_prompt: bool = False, **settings):
        self.shared_prompt = shared_prompt  # read by item_lengths, which the base __init__ calls
        super().__init__(pairs, **{**settings, "pin_memory": False})

    def item_lengths(self, pairs) -> np.ndarray:
        return pair_lengths(pairs, shared_prompt=self.shared_prompt)  # with shared_prompt, the prompt once

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
