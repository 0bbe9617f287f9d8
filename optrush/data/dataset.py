"""Training and evaluation examples from the data files named by a `DataConfig`, with a report of what happened.

    train, evals, report = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    print(report.format())

Reads `data.path` (JSONL, JSON, Parquet, CSV, a text file or folder, a saved HF dataset or a hub dataset:
`optrush.data.sources`; bad rows raise or, with `data.on_error=skip`, go to a rejects file), applies the
`data.clean` rules to the training records when any is on (`optrush.data.clean`; counted per rule; an error when
none is left), turns every record into an `Example` (`optrush.data.formats`, or `optrush.data.chat` for
`data.format=chat`; tokenized in chunks with the fast tokenizer's batch call, over `data.num_proc` processes),
applies `data.too_long` to examples longer than `data.max_length` (truncate / drop / error, or for
`data.format=text` split into consecutive pieces; always counted, with the tokens truncation cut), then takes
the evaluation examples from `data.eval_path`, or holds out `data.eval_fraction` of the training examples
(chosen by `seed`, so the split is the same on every run and every rank; the pieces of a split document stay
together, so no document is trained on and evaluated on). Raises `DataError` when no training example is left. With
`data.cache_dir`, a source's examples and counts are read from the tokenize-once cache when its key matches
(`optrush.data.cache`).

Memory is bounded by the tokens, not the records: records are streamed (the cleaning rules that need corpus
statistics re-read the source, one pass each), and examples are stored as flat int32 arrays, about 8 bytes per
token (`optrush.data.examples.Examples`, which `build_datasets` returns for train and eval).
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import islice
from operator import itemgetter
from pathlib import Path

import numpy as np

from optrush.config.schema import DataConfig
from optrush.data import cache
from optrush.data.chat import chat_segments, check_chat_template, segments_example
from optrush.data.clean import CleanReport, clean_stream, rules_from_config
from optrush.data.examples import Example, Examples
from optrush.data.formats import build_example, render, special_ids
from optrush.data.reader import DataError
from optrush.data.sources import Recounted, Rejects, decode_json_columns, is_text_source, iter_records, \
    parse_hub_path

CHUNK_RECORDS = 1024
IN_FLIGHT_PER_PROCESS = 2
"""data.num_proc: chunks submitted ahead per worker process (bounds the records held in flight)."""


@dataclass
class Tally:
    """Counts for one data file."""
    path: str
    records: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Reason -> examples dropped: `too_long` (data.too_long=drop), `empty` (no tokens at all),
    `no_trained_tokens` (truncation left only prompt tokens); preference pairs: `too_long`, `identical` and the
    data.clean rule names (`optrush.data.preference.PAIR_DROPS`)."""
    truncated: int = 0
    truncated_tokens: int = 0
    """Tokens that truncation cut off the `truncated` examples (their EOS included): one per position removed."""
    split: int = 0
    """Documents longer than data.max_length cut into pieces (data.too_long=split)."""
    split_pieces: int = 0
    """Examples the split documents gave beyond one each."""
    rejected: int = 0
    """Malformed rows skipped under data.on_error=skip (written to `rejects_path`)."""
    rejects_path: str | None = None
    reject_messages: list[str] = field(default_factory=list)
    cache: str | None = None
    """data.cache_dir: `hit` (examples loaded from the cache) or `written`; None without a cache."""

    def skipped(self) -> str:
        """What data.on_error=skip skipped (call when `rejected`)."""
        return (f"skipped {self.rejected} malformed rows (data.on_error=skip), written to {self.rejects_path}; "
                f"first: {self.reject_messages[0]}")

    def unread(self) -> list[str]:
        """Why records gave nothing besides the counted drops: malformed rows skipped, or no records at all."""
        if self.rejected:
            return [self.skipped()]
        return [] if self.records else ["the file holds no records"]

    def as_dict(self) -> dict:
        return {"path": self.path, "records": self.records, "dropped": dict(self.dropped),
                "truncated": self.truncated, "truncated_tokens": self.truncated_tokens, "split": self.split,
                "split_pieces": self.split_pieces, "rejected": self.rejected, "rejects_path": self.rejects_path}

    def saved(self) -> dict:
        """The counts a data.cache_dir entry keeps (every field but the path and the cache state), for `restore` to
        report a cache hit as the run that wrote it."""
        return {f.name: dict(self.dropped) if f.name == "dropped" else getattr(self, f.name)
                for f in fields(self) if f.name not in ("path", "cache")}

    def restore(self, saved: dict) -> None:
        for name, value in saved.items():
            if name == "dropped":
                self.dropped.update(value)
            else:
                setattr(self, name, value)
        self.cache = "hit"

    def add(self, part: Tally) -> None:
        """Add the counts of `part` (a chunk of the same file, encoded in a worker process)."""
        for name in ("records", "truncated", "truncated_tokens", "split", "split_pieces"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.dropped.update(part.dropped)


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
    clean: CleanReport | None = None
    """What the `data.clean` rules dropped from the training records (None when no rule is on)."""

    def format(self) -> str:
        evals = f" + {self.eval_examples} eval" if self.eval_examples else ""
        lines = [f"data: {self.train.records} records from {self.train.path} -> {self.train_examples} train"
                 f"{evals} examples"]
        if self.eval is not None:
            lines.append(f"  eval: {self.eval.records} records from {self.eval.path}")
        if self.clean is not None:
            lines.append("  cleaning (data.clean):\n" + self.clean.format())
        for tally in (self.train, self.eval):
            if tally is not None and tally.cache is not None:
                how = "loaded from" if tally.cache == "hit" else "saved to"
                lines.append(f"  {tally.path}: tokenized examples {how} the cache (data.cache_dir)")
            if tally is not None and tally.rejected:
                lines.append(f"  {tally.path}: {tally.skipped()}")
            if tally is not None:
                lines += self.length_lines(tally)
        share = self.trained_tokens / max(self.tokens, 1)
        lines.append(f"  train tokens: {self.tokens:,} positions, {self.trained_tokens:,} trained ({share:.1%})")
        return "\n".join(lines)

    def length_lines(self, tally: Tally) -> list[str]:
        """What data.too_long did to the examples of one file (nothing when no example was dropped or cut)."""
        setting = f"data.too_long={self.too_long}, data.max_length={self.max_length}"
        lines = []
        if tally.dropped or tally.truncated:
            dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(tally.dropped.items())) or "none"
            # a no_trained_tokens drop was truncated too, but is counted once, as the drop
            emptied = tally.dropped["no_trained_tokens"]
            also = f" + {emptied} that truncation left with no trained token (no_trained_tokens)" if emptied else ""
            cut = f" ({tally.truncated_tokens:,} tokens cut)" if tally.truncated else ""
            lines.append(f"  {tally.path}: dropped {dropped}; truncated {tally.truncated} kept{cut}{also} ({setting})")
        if tally.split:
            lines.append(f"  {tally.path}: split long documents: {tally.split}, into "
                         f"{tally.split + tally.split_pieces} examples ({tally.split_pieces} more; {setting})")
        return lines

    def as_dict(self) -> dict:
        return {"train": self.train.as_dict(), "eval": None if self.eval is None else self.eval.as_dict(),
                "train_examples": self.train_examples,
                "eval_examples": self.eval_examples, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "clean": None if self.clean is None else self.clean.as_dict()}


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int,
                   purpose: str = "training") -> tuple[Examples, Examples, DataReport]:
    """(train examples, eval examples, report); see the module docstring. `purpose`: what the caller reads
    data.path for (`training`, `evaluation`), as the error says it when no example is left."""
    if cfg.path is None:
        raise DataError("data.path is not set: give the training data (a JSONL file), e.g. data.path=train.jsonl")
    if cfg.format == "chat":
        check_chat_template(cfg, tokenizer)
    train_tally = Tally(path=str(cfg.path))
    train, clean_report = encode_source(cfg.path, cfg=cfg, tokenizer=tokenizer, tally=train_tally,
                                        rules=rules_from_config(cfg, tokenizer), rejects_path=cfg.rejects_path)
    if not train:  # before the eval split, which would otherwise blame data.eval_fraction
        raise DataError(no_examples_message(cfg, train_tally, purpose=purpose))
    eval_tally = None
    if cfg.eval_path is not None:
        eval_tally = Tally(path=str(cfg.eval_path))
        evals, _ = encode_source(cfg.eval_path, cfg=cfg, tokenizer=tokenizer, tally=eval_tally, rules=[],
                                 rejects_path=eval_rejects_path(cfg))
    elif cfg.eval_fraction > 0:
        starts = document_starts(train, cfg.max_length) if cfg.too_long == "split" else None
        train, evals = split_off(train, fraction=cfg.eval_fraction, seed=seed, starts=starts)
    else:
        evals = Examples.from_examples([])
    report = DataReport(train=train_tally, eval=eval_tally, train_examples=len(train), eval_examples=len(evals),
                        max_length=cfg.max_length, too_long=cfg.too_long, tokens=train.num_tokens,
                        trained_tokens=train.num_trained, clean=clean_report)
    return train, evals, report


DROP_ADVICE = {
    "no_trained_tokens": "the prompt alone reaches data.max_length={max_length}, so truncation leaves no "
                         "completion token to train on: raise data.max_length",
    "too_long": "longer than data.max_length={max_length} (data.too_long=drop): raise data.max_length or set "
                "data.too_long=truncate",
    "empty": "rendered to no tokens: check data.format and the column names (data.text_column, ...)",
}


def no_examples_message(cfg: DataConfig, tally: Tally, *, purpose: str) -> str:
    """Why a data file gave no example: the drop counts, largest first, each with what to change."""
    causes = [f"{count} dropped as {reason}: " + DROP_ADVICE[reason].format(max_length=cfg.max_length)
              for reason, count in tally.dropped.most_common()]
    causes += tally.unread()
    return f"no {purpose} examples left from {cfg.path}: read {tally.records} records; " + "; ".join(causes)


def encode_source(path: str | Path, *, cfg: DataConfig, tokenizer, tally: Tally, rules: list,
                  rejects_path: str | None) -> tuple[Examples, CleanReport | None]:
    """Examples of one data source, after the cleaning `rules` (when any), with data.on_error applied; counts into
    `tally`. Returns (examples, cleaning report or None). Records are streamed: cleaning rules that need corpus
    statistics read the source once more each (`optrush.data.clean.Cleaner`), and tokenized examples go straight
    into flat arrays (`optrush.data.examples.Examples`)."""
    key = None
    if cfg.cache_dir is not None:
        key = cache.cache_key(path, cfg=cfg, tokenizer=tokenizer)
        if (hit := cache.load(cfg.cache_dir, key)) is not None:
            examples, meta = hit
            tally.restore(meta["tally"])
            return examples, None if meta["clean"] is None else CleanReport(**meta["clean"])
    with collect_rejects(path, cfg=cfg, tally=tally, rejects_path=rejects_path) as rejects:
        # fit passes: bad rows are recorded once, by the final pass, so these passes ignore them
        ignore = Recounted() if rejects is not None else None
        try:
            numbered, cleaner = clean_stream(read_source(path, cfg=cfg, rejects=rejects), rules,
                                             record=itemgetter(1), reread=lambda: read_source(path, cfg=cfg,
                                                                                             rejects=ignore))
            if cfg.num_proc > 1:
                examples = encode_parallel(numbered, cfg=cfg, tokenizer=tokenizer, tally=tally, rejects=rejects)
            else:
                examples = Examples.from_examples(encode_records(numbered, cfg=cfg, tokenizer=tokenizer, tally=tally,
                                                                 rejects=rejects))
        except DataError as err:
            if rejects is not None:
                raise
            render_one = partial(render_record, cfg=cfg, tokenizer=tokenizer)
            raise first_bad_row_error(path, err, cfg=cfg, render_one=render_one) from None
        report = None
        if cleaner is not None:
            report = cleaner.report()
            if report.total and not report.kept:  # no record at all: `no_examples_message` says so
                raise DataError(f"data.clean dropped every record of {path}:\n{report.format()}\nloosen the "
                                "data.clean rules that dropped the most")
    if key is not None:
        cache.save(cfg.cache_dir, key, examples, {"tally": tally.saved(),
                                                  "clean": None if report is None else report.as_dict()})
        tally.cache = "written"
    return examples, report


@contextmanager
def collect_rejects(path: str | Path, *, cfg: DataConfig, tally: Tally,
                    rejects_path: str | None) -> Iterator[Rejects | None]:
    """data.on_error=skip: the sink for the bad rows of the source at `path` (written to `rejects_path`, by default
    next to the source); their count and first messages go into `tally` on exit. None under data.on_error=error."""
    if cfg.on_error != "skip":
        yield None
        return
    hub = parse_hub_path(path)
    tally.rejects_path = rejects_path or (hub.rejects_name if hub else f"{path}.rejects.jsonl")
    rejects = Rejects(tally.rejects_path)
    try:
        yield rejects
    finally:
        rejects.close()
        tally.rejected, tally.reject_messages = rejects.count, rejects.messages


def eval_rejects_path(cfg: DataConfig) -> str | None:
    """Where data.on_error=skip writes the bad rows of data.eval_path (None: next to that file)."""
    return cfg.rejects_path and f"{cfg.rejects_path}.eval.jsonl"


def read_source(path: str | Path, *, cfg: DataConfig, rejects) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of a data source with data.json_columns decoded; bad rows go to `rejects`."""
    if cfg.format != "text" and is_text_source(path):
        raise DataError(f"{path} is plain text, read as whole documents (one per file), which only data.format=text "
                        f"trains on; data.format={cfg.format} needs records with columns: set data.format=text, or "
                        "give data.path as a JSONL, Parquet or CSV file holding those columns")
    key = "data.path" if str(path) == str(cfg.path) else "data.eval_path"
    numbered = iter_records(path, rejects=rejects, key=key)
    return decode_json_columns(numbered, cfg.json_columns, rejects) if cfg.json_columns else numbered


class BadRows:
    """A Rejects stand-in that counts the rows a pass cannot read and keeps the first few."""

    KEEP = 4

    def __init__(self):
        self.count = 0
        self.first: list[tuple[str, str]] = []
        """(where, message) of the first KEEP bad rows."""

    def add(self, where: str, error: str, row: object = None) -> None:
        self.count += 1
        if len(self.first) < self.KEEP:
            self.first.append((where, error))


def first_bad_row_error(path: str | Path, reported: DataError, *, cfg: DataConfig, render_one) -> DataError:
    """The error to show for `reported`, the first one met in the source at `path` under data.on_error=error. Rows
    are not met in file order (a fitting pass, or a chunk, reads a later unreadable row before an earlier record is
    rendered), so one more pass finds every row the source cannot read or `render_one(record, where=...)` cannot
    render: the first bad row in file order is reported, with how many others there are, so that a user fixing
    rows learns how many are left instead of meeting them one run at a time. An error that is not a row's comes
    back as it is."""
    bad = BadRows()
    try:
        for where, record in read_source(path, cfg=cfg, rejects=bad):
            try:
                render_one(record, where=where)
            except DataError as err:
                bad.add(where, str(err))
    except DataError:  # not a row's problem: the pass fails as the first did
        return reported
    if not bad.count:
        return reported
    (_, message), others, remaining = bad.first[0], bad.first[1:], bad.count - 1
    if not remaining:
        return DataError(message)
    listed = ", ".join(where for where, _ in others[:3]) + (", ..." if remaining > 3 else "")
    rows = "row" if remaining == 1 else "rows"
    return DataError(f"{message}; {remaining} other {rows} of {path} cannot be read or rendered either ({listed}): "
                     "fix those too, or set data.on_error=skip to skip them all (counted, and written to a rejects "
                     "file)")


class _Collect:
    """A Rejects stand-in for worker processes: the rows go back to the parent, which writes them."""

    def __init__(self):
        self.rows: list[tuple[str, str, object]] = []

    def add(self, where: str, error: str, row: object = None) -> None:
        self.rows.append((where, error, row))


_WORKER: dict = {}


def _init_worker(encode, skip: bool) -> None:
    _WORKER.update(encode=encode, skip=skip)


def _encode_chunk(chunk: list) -> tuple[object, Tally, list]:
    tally, collect = Tally(path=""), _Collect()
    rejects = {"rejects": collect} if _WORKER["skip"] else {}
    return _WORKER["encode"](chunk, tally=tally, **rejects), tally, collect.rows


def encode_examples(chunk: list[tuple[str, dict]], *, cfg: DataConfig, tokenizer, tally: Tally,
                    rejects: Rejects | _Collect | None = None) -> Examples:
    """`encode_records` of one chunk as a flat store (cheap to send back from a worker process)."""
    return Examples.from_examples(encode_records(chunk, cfg=cfg, tokenizer=tokenizer, tally=tally, rejects=rejects))


def encode_parallel(numbered, *, cfg: DataConfig, tokenizer, tally: Tally, rejects: Rejects | None) -> Examples:
    """`encode_records` over `cfg.num_proc` processes, chunk by chunk, in order (same examples, same counts)."""
    encode = partial(encode_examples, cfg=cfg, tokenizer=tokenizer)
    return Examples.concat(parallel_chunks(numbered, encode, num_proc=cfg.num_proc, tally=tally, rejects=rejects))


def parallel_chunks(items, encode, *, num_proc: int, tally: Tally, rejects: Rejects | None) -> list:
    """`encode(chunk, tally=..., rejects=...)` over `num_proc` processes, chunk by chunk: the parts in order, their
    counts added to `tally` (the same as one process would give). `encode` gets `rejects` (a stand-in whose rows
    the parent writes to `rejects`) only when `rejects` is given. At most IN_FLIGHT_PER_PROCESS chunks per process
    are submitted ahead (`bounded_map`), so the items read but not yet encoded stay bounded; parts should be cheap
    to pickle (flat arrays)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    items = iter(items)
    chunks = iter(lambda: list(islice(items, CHUNK_RECORDS)), [])
    parts = []
    # fork: workers inherit the loaded tokenizer and modules instead of importing torch again
    with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork"), initializer=_init_worker,
                             initargs=(encode, rejects is not None)) as pool:
        ahead = IN_FLIGHT_PER_PROCESS * num_proc
        for part, part_tally, bad in bounded_map(pool, _encode_chunk, chunks, ahead=ahead):
            parts.append(part)
            tally.add(part_tally)
            for row in bad:
                rejects.add(*row)
    return parts


def bounded_map(pool: Executor, fn, items, *, ahead: int) -> Iterator:
    """`pool.map(fn, items)` in order, but with at most `ahead` calls submitted and not yet yielded
    (`Executor.map` submits every item at once: the whole corpus would sit in the queue)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def render_record(record: dict, *, cfg: DataConfig, tokenizer, where: str):
    """What `data.format` makes of a record: chat segments, else (prompt, completion) texts; DataError if it can't."""
    if cfg.format == "chat":
        return chat_segments(record, cfg=cfg, tokenizer=tokenizer, where=where)
    return render(record, cfg=cfg, where=where)


def render_each(numbered, render_one, *, rejects: Rejects | None) -> tuple[list[str], list]:
    """(wheres, renderings) of the (where, record) pairs that `render_one(record, where=where)` renders; a record
    it refuses (DataError) raises, or with `rejects` is recorded there and left out."""
    wheres, rendered = [], []
    for where, record in numbered:
        try:
            rendered.append(render_one(record, where=where))
        except DataError as err:
            if rejects is None:
                raise
            rejects.add(where, str(err), record)
            continue
        wheres.append(where)
    return wheres, rendered


def encode_records(numbered, *, cfg: DataConfig, tokenizer, tally: Tally,
                   rejects: Rejects | None = None) -> Iterator[Example]:
    """Examples of (where, record) pairs, tokenized in chunks; counts into `tally`. With `rejects`, a record that
    cannot be rendered (missing column, wrong type) is recorded there and skipped instead of raising."""
    numbered = iter(numbered)
    bos_id, eos_id = special_ids(tokenizer)
    render_one = partial(render_record, cfg=cfg, tokenizer=tokenizer)
    while chunk := list(islice(numbered, CHUNK_RECORDS)):
        tally.records += len(chunk)
        wheres, texts = render_each(chunk, render_one, rejects=rejects)
        if cfg.format == "chat":
            examples = chat_examples(texts, tokenizer)
        else:
            prompts = tokenize([prompt for prompt, _ in texts], tokenizer)
            completions = tokenize([completion for _, completion in texts], tokenizer)
            examples = [build_example(prompt_ids, completion_ids, bos_id=bos_id, eos_id=eos_id)
                        for prompt_ids, completion_ids in zip(prompts, completions)]
        for where, example in zip(wheres, examples):
            yield from fit_length(example, cfg=cfg, where=where, tally=tally)


def chat_examples(conversations: list[list[tuple[str, bool]]], tokenizer) -> list[Example]:
    """Examples of chat segment lists, every segment of the chunk tokenized in one batched call."""
    ids = iter(tokenize([text for segments in conversations for text, _ in segments], tokenizer))
    return [segments_example([next(ids) for _ in segments], [trained for _, trained in segments])
            for segments in conversations]


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, no special tokens; one batched call (the fast tokenizer parallelises it)."""
    if not any(texts):
        return [[] for _ in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def fit_length(example: Example, *, cfg: DataConfig, where: str, tally: Tally) -> list[Example]:
    """Apply `data.too_long` (and drop examples with no tokens): the examples to train on, none when dropped;
    drops, cuts and splits are counted in `tally`."""
    if not len(example):
        tally.dropped["empty"] += 1
        return []
    if len(example) <= cfg.max_length:
        return [example]
    if cfg.too_long == "error":
        raise DataError(f"{where}: {len(example)} tokens > data.max_length={cfg.max_length}; raise data.max_length, "
                        "or set data.too_long=truncate or data.too_long=drop (data.format=text: also split)")
    if cfg.too_long == "drop":
        tally.dropped["too_long"] += 1
        return []
    if cfg.too_long == "split":
        pieces = split_pieces(example, cfg.max_length)
        tally.split += 1
        tally.split_pieces += len(pieces) - 1
        return pieces
    cut = Example(example.input_array[:cfg.max_length], example.label_array[:cfg.max_length])
    if cut.num_trained == 0:
        tally.dropped["no_trained_tokens"] += 1
        return []
    tally.truncated += 1
    tally.truncated_tokens += len(example) - len(cut)
    return [cut]


def split_pieces(example: Example, max_length: int) -> list[Example]:
    """Consecutive pieces of at most `max_length` positions. Each position keeps its input and its target, so no
    token is lost or repeated: a piece's first input is the previous piece's last target (only the first piece
    starts with BOS, only the last ends with the EOS target)."""
    return [Example(example.input_array[start:start + max_length], example.label_array[start:start + max_length])
            for start in range(0, len(example), max_length)]


def document_starts(examples: Examples, max_length: int) -> np.ndarray:
    """Per example, whether it begins a document (False for the second and later pieces of a split document).
    A piece is followed by its continuation when it is `max_length` long and its last target is the next example's
    first input (`split_pieces`). A whole document that happens to end the same way is taken as continued by the
    next one: that only holds the two out together, it never puts one document on both sides of a split."""
    starts = np.ones(len(examples), dtype=bool)
    ends = examples.offsets[1:-1]  # where each example but the last ends and the next begins
    full = examples.lengths[:-1] == max_length
    starts[1:] = ~(full & (examples.labels[ends - 1] == examples.tokens[ends]))
    return starts


def split_off(examples, *, fraction: float, seed: int, starts: np.ndarray | None = None):
    """(kept, held out): round(fraction * n) of the n documents (at least one) chosen by `seed`; both keep file
    order. A document is one example, or with `starts` (`document_starts`) the examples from one start to the next.
    An `Examples` store splits into two stores; any other sequence (e.g. preference pairs) into two lists."""
    document = np.arange(len(examples)) if starts is None else np.cumsum(starts) - 1
    n_documents = len(examples) if starts is None else int(starts.sum())
    n_eval = max(1, round(fraction * n_documents))
    if n_eval >= n_documents:
        unit = "examples" if starts is None else "documents"
        raise DataError(f"data.eval_fraction={fraction} of {n_documents} {unit} leaves none to train on; use a "
                        "smaller fraction or more data")
    held_document = np.zeros(n_documents, dtype=bool)
    held_document[np.random.default_rng(seed).permutation(n_documents)[:n_eval]] = True
    held = held_document[document]
    if isinstance(examples, Examples):
        return examples.select(~held), examples.select(held)
    return ([e for e, h in zip(examples, held.tolist()) if not h], [e for e, h in zip(examples, held.tolist()) if h])
