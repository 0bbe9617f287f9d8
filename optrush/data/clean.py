"""Record cleaning: composable rules that count what they drop and keep a few dropped examples to show.

    kept, report = clean_records(records)                      # the default recipe rules, records in memory
    kept, report = clean_records(records, rules=[NonEmpty(fields=("text",)), ExactDuplicates()])
    cleaner = Cleaner(rules_from_config(cfg.data, tokenizer))   # data.clean.*, streamed from a file
    cleaner.fit(lambda: (record for _, record in iter_records(path)))
    for where, record in cleaner.filter(iter_records(path), record=itemgetter(1)): ...
    print(cleaner.report().format())

A rule has a `name`, `reject(index, record) -> reason | None` (`index`: the record's position in the stream, the
same on every pass) and, when it needs corpus statistics (`needs_fit`: ingredient frequencies, duplicate hashes,
MinHash signatures), `fit(pairs)`: one pass over the (index, record) pairs that reach it. Rules run as stages in
the given order: each sees only the records the previous ones kept, and each dropped record is counted under the
first rule that rejected it. Nothing is dropped without being counted.

Memory stays bounded however large the corpus: `Cleaner` makes one pass over a re-readable stream for each rule
that needs fitting (it sees the survivors of the rules before it) and keeps only compact per-record state (a
16-byte hash per record for exact duplicates, a MinHash signature for near duplicates, a token count, counts per
vocabulary item), then filters in a last pass that streams records on to tokenization.
"""
from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol, TypeVar

import numpy as np

from optrush.config.schema import DataConfig
from optrush.data.reader import DataError

Item = TypeVar("Item")


class Rule(Protocol):
    name: str
    needs_fit: bool

    def fit(self, records: Iterable[tuple[int, dict]]) -> None: ...

    def reject(self, index: int, record: dict) -> str | None: ...


class RecordRule:
    """Base of the rules that judge each record on its own (no corpus statistics, no fit pass)."""
    needs_fit = False

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        pass


class IndexSet:
    """A set of stream positions as a bool array (one byte per position up to the largest member)."""

    def __init__(self, indices: np.ndarray):
        indices = np.asarray(indices, dtype=np.int64)
        self.bits = np.zeros(int(indices.max()) + 1 if len(indices) else 0, dtype=bool)
        self.bits[indices] = True

    def __contains__(self, index: int) -> bool:
        return index < len(self.bits) and bool(self.bits[index])

    def __len__(self) -> int:
        return int(self.bits.sum())


class NonEmpty(RecordRule):
    """Drop records where a field is missing, null (a Parquet/Arrow null, JSON null), blank, or an empty list."""
    name = "empty"

    def __init__(self, *, fields: Sequence[str] = ("title", "ingredients", "directions")):
        self.fields = tuple(fields)

    def reject(self, index: int, record: dict) -> str | None:
        for name in self.fields:
            if name not in record:
                return f"no {name!r} field"
            value = record[name]
            if value is None:
                return f"{name!r} is null"
            if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
                return f"{name!r} is empty"
        return None


class ExactDuplicates:
    """Keep the first of records that are equal field for field. The fit pass keeps a 16-byte digest per record
    (numpy, not Python objects) and sorts them once; later copies are then looked up by stream position."""
    name = "duplicate"
    needs_fit = True

    def __init__(self):
        self.duplicates = IndexSet(np.zeros(0, dtype=np.int64))

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        indices = array("q")
        digests = bytearray()
        for index, record in records:
            indices.append(index)
            digests += hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(),
                                       digest_size=16).digest()
        keys = np.frombuffer(bytes(digests), dtype="V16")
        order = np.argsort(keys, kind="stable")  # stable: the first of equal digests is the earliest record
        ranked = keys[order]
        later = order[1:][ranked[1:] == ranked[:-1]]
        self.duplicates = IndexSet(np.frombuffer(indices, dtype=np.int64)[later])

    def reject(self, index: int, record: dict) -> str | None:
        return "same as an earlier record" if index in self.duplicates else None


class TooLong(RecordRule):
    """Drop records with more than `max_chars` characters of text or more than `max_steps` items in
    `steps_field` (for recipes: direction steps)."""
    name = "too_long"

    def __init__(self, *, max_chars: int = 12_000, max_steps: int = 100, steps_field: str = "directions"):
        self.max_chars, self.max_steps, self.steps_field = max_chars, max_steps, steps_field

    def reject(self, index: int, record: dict) -> str | None:
        steps = record.get(self.steps_field)
        if isinstance(steps, list) and len(steps) > self.max_steps:
            return f"{len(steps)} {self.steps_field} > {self.max_steps}"
        chars = text_length(record)
        if chars > self.max_chars:
            return f"{chars} characters > {self.max_chars}"
        return None


class RareVocabulary:
    """Drop records that use an item of `field` (for recipes: the NER ingredient names) found in fewer than
    `min_count` records of the corpus: typos, made-up or one-off items a model cannot learn."""
    name = "rare_vocabulary"
    needs_fit = True

    def __init__(self, *, min_count: int = 2, field: str = "NER"):
        self.min_count, self.field = min_count, field
        self.counts: Counter[str] = Counter()

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        self.counts = Counter()
        for _, record in records:
            self.counts.update(set(record.get(self.field) or ()))

    def reject(self, index: int, record: dict) -> str | None:
        for item in record.get(self.field) or ():
            if self.counts[item] < self.min_count:
                return f"{item!r} is in {self.counts[item]} record(s) < {self.min_count}"
        return None


class Pattern(RecordRule):
    """Drop records whose text (`record_text`) matches any of the regular expressions."""
    name = "pattern"

    def __init__(self, *, patterns: Sequence[str]):
        self.patterns = []
        for pattern in patterns:
            try:
                self.patterns.append(re.compile(pattern))
            except re.error as err:
                raise DataError(f"data.clean.drop_patterns: {pattern!r} is not a valid regular expression "
                                f"({err})") from None

    def reject(self, index: int, record: dict) -> str | None:
        text = record_text(record)
        for pattern in self.patterns:
            if match := pattern.search(text):
                return f"matches {pattern.pattern!r} at {match.group()[:24]!r}"
        return None


class Charset(RecordRule):
    """Drop records holding a character outside `chars`, a regex character class such as `[\\x00-\\x7f]`."""
    name = "charset"

    def __init__(self, *, chars: str):
        try:
            self.outside = re.compile(f"[^{chars[1:-1]}]" if chars.startswith("[") and chars.endswith("]")
                                      else f"[^{chars}]")
        except re.error as err:
            raise DataError(f"data.clean.charset={chars!r} is not a valid regex character class ({err}); "
                            "write e.g. [\\x00-\\x7f]") from None

    def reject(self, index: int, record: dict) -> str | None:
        if match := self.outside.search(record_text(record)):
            return f"character {match.group()!r} (U+{ord(match.group()):04X}) is outside the charset"
        return None


class Bounds(RecordRule):
    """Drop records whose measure (characters, list items) is below `low` or above `high` (0: no bound)."""

    def __init__(self, *, name: str, unit: str, measure: Callable[[dict], int], low: int = 0, high: int = 0):
        self.name, self.unit, self.measure, self.low, self.high = name, unit, measure, low, high

    def reject(self, index: int, record: dict) -> str | None:
        return self.check(self.measure(record))

    def check(self, value: int) -> str | None:
        if self.low and value < self.low:
            return f"{value} {self.unit} < {self.low}"
        if self.high and value > self.high:
            return f"{value} {self.unit} > {self.high}"
        return None


class TokenBounds(Bounds):
    """Bounds on the token count of records as `data.format` renders them (BOS included, as `len(example)`
    counts). The fit pass counts them in batched tokenizer calls and keeps one int32 per record."""
    needs_fit = True

    def __init__(self, *, cfg: DataConfig, tokenizer, low: int = 0, high: int = 0, chunk: int = 1024):
        super().__init__(name="tokens", unit="tokens", measure=len, low=low, high=high)
        self.cfg, self.tokenizer, self.chunk = cfg, tokenizer, chunk
        self.counts = np.zeros(0, dtype=np.int32)

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        records = iter(records)
        indices, lengths = array("q"), array("q")
        while batch := list(islice(records, self.chunk)):
            indices.extend(index for index, _ in batch)
            lengths.extend(token_lengths([record for _, record in batch], cfg=self.cfg, tokenizer=self.tokenizer))
        self.counts = np.full(max(indices, default=-1) + 1, -1, dtype=np.int32)
        self.counts[np.frombuffer(indices, dtype=np.int64)] = np.frombuffer(lengths, dtype=np.int64)

    def reject(self, index: int, record: dict) -> str | None:
        count = int(self.counts[index])
        # a record data.format cannot render has no length: encoding reports it with its file and row (or, with
        # data.on_error=skip, rejects it)
        return None if count == UNRENDERABLE else self.check(count)


UNRENDERABLE = -1
"""`token_lengths` of a record that `data.format` cannot render (a missing or null column, a bad message list)."""


def token_lengths(records: Sequence[dict], *, cfg: DataConfig, tokenizer, chunk: int = 1024) -> list[int]:
    """Positions each record takes as an Example (BOS + prompt + completion tokens), in record order;
    UNRENDERABLE for a record `data.format` cannot render (whoever encodes it reports why, naming file and row)."""
    out: list[int] = []
    for start in range(0, len(records), chunk):
        out += _chunk_lengths(records[start:start + chunk], cfg=cfg, tokenizer=tokenizer)
    return out


def _chunk_lengths(records: Sequence[dict], *, cfg: DataConfig, tokenizer) -> list[int]:
    from optrush.data.dataset import chat_examples, render_record, tokenize

    rendered: dict[int, object] = {}
    for k, record in enumerate(records):
        try:
            rendered[k] = render_record(record, cfg=cfg, tokenizer=tokenizer, where="")
        except DataError:
            pass
    texts = list(rendered.values())
    if cfg.format == "chat":
        lengths = [len(example) for example in chat_examples(texts, tokenizer)]
    else:
        bos = 0 if tokenizer.bos_token_id is None else 1
        prompts = tokenize([p for p, _ in texts], tokenizer)
        completions = tokenize([c for _, c in texts], tokenizer)
        lengths = [bos + len(p) + len(c) for p, c in zip(prompts, completions)]
    by_record = dict(zip(rendered, lengths))
    return [by_record.get(k, UNRENDERABLE) for k in range(len(records))]


def rules_from_config(cfg: DataConfig, tokenizer=None) -> list[Rule]:
    """The rules `data.clean` switches on, in the documented order (an empty list when all are off).
    `tokenizer` is needed only for `min_tokens` / `max_tokens`."""
    c = cfg.clean
    rules: list[Rule] = []
    if c.drop_patterns:
        rules.append(Pattern(patterns=c.drop_patterns))
    if c.charset:
        rules.append(Charset(chars=c.charset))
    if c.nonempty:
        rules.append(NonEmpty(fields=c.nonempty))
    if c.min_chars or c.max_chars:
        rules.append(Bounds(name="chars", unit="characters", measure=text_length, low=c.min_chars, high=c.max_chars))
    if c.min_items or c.max_items:
        items = c.items_field
        rules.append(Bounds(name="items", unit=f"{items} items", low=c.min_items, high=c.max_items,
                            measure=lambda record: len(record.get(items) or ())))
    if c.min_tokens or c.max_tokens:
        if tokenizer is None:
            raise ValueError("data.clean.min_tokens/max_tokens need a tokenizer")
        rules.append(TokenBounds(cfg=cfg, tokenizer=tokenizer, low=c.min_tokens, high=c.max_tokens))
    if c.dedup:
        rules.append(ExactDuplicates())
    if c.near_dedup:
        from optrush.data.neardup import NearDuplicates

        rules.append(NearDuplicates(threshold=c.near_dedup_threshold, ngram=c.near_dedup_ngram))
    if c.rare_min_count:
        rules.append(RareVocabulary(min_count=c.rare_min_count, field=c.rare_field))
    return rules


def recipe_rules() -> list[Rule]:
    """The default rules, for RecipeNLG-style records (they catch every bad kind `generate_recipes` makes)."""
    return [NonEmpty(), ExactDuplicates(), TooLong(), RareVocabulary()]


@dataclass
class CleanReport:
    total: int
    kept: int
    dropped: dict[str, int]
    """Records dropped per rule, in rule order (zeros included)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """A few dropped records per rule: a short preview and the reason."""

    def format(self) -> str:
        width = max([len("rule")] + [len(name) for name in self.dropped])
        lines = [f"  {'rule':<{width}}  {'dropped':>8}  example"]
        for name, count in self.dropped.items():
            shown = self.examples.get(name) or ["-"]
            lines.append(f"  {name:<{width}}  {count:>8}  {shown[0]}")
            lines += [f"  {'':<{width}}  {'':>8}  {more}" for more in shown[1:]]
        lines.append(f"  kept {self.kept} of {self.total} records ({self.total - self.kept} dropped)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "examples": {k: list(v) for k, v in self.examples.items()}}


class Cleaner:
    """Rules as stages over a re-readable stream of records, in bounded memory (see the module docstring).

    `fit(open_records)` makes one pass per rule that needs fitting (`open_records()` must yield the same records
    in the same order every time); `filter(items)` then yields the items whose record passes every rule, counting
    the rest per rule; `report()` is complete once that stream is exhausted."""

    def __init__(self, rules: Sequence[Rule], *, keep_examples: int = 3):
        self.rules, self.keep_examples = list(rules), keep_examples
        self.total = self.kept = 0
        self.dropped = {rule.name: 0 for rule in self.rules}
        self.examples: dict[str, list[str]] = {rule.name: [] for rule in self.rules}

    def fit(self, open_records: Callable[[], Iterable[dict]]) -> None:
        for k, rule in enumerate(self.rules):
            if rule.needs_fit:
                rule.fit(self._survivors(open_records(), self.rules[:k]))

    @staticmethod
    def _survivors(records: Iterable[dict], rules: Sequence[Rule]) -> Iterator[tuple[int, dict]]:
        for index, record in enumerate(records):
            if all(rule.reject(index, record) is None for rule in rules):
                yield index, record

    def filter(self, items: Iterable[Item], *, record: Callable[[Item], dict] = lambda item: item) -> Iterator[Item]:
        for index, item in enumerate(items):
            self.total += 1
            values = record(item)
            for rule in self.rules:
                reason = rule.reject(index, values)
                if reason is not None:
                    self.dropped[rule.name] += 1
                    shown = self.examples[rule.name]
                    if len(shown) < self.keep_examples:
                        shown.append(f"{preview(values)}: {reason}")
                    break
            else:
                self.kept += 1
                yield item

    def report(self) -> CleanReport:
        return CleanReport(total=self.total, kept=self.kept, dropped=dict(self.dropped),
                           examples={name: list(shown) for name, shown in self.examples.items()})


def clean_stream(items: Iterable[Item], rules: Sequence[Rule], *, reread: Callable[[], Iterable[Item]],
                 record: Callable[[Item], dict]) -> tuple[Iterable[Item], Cleaner | None]:
    """(the `items` that pass `rules`, the Cleaner counting them, its report complete once they are consumed);
    without rules, (`items` as they are, None). The rules that need corpus statistics fit first, over `reread()`:
    a fresh stream of the same items, in the same order."""
    if not rules:
        return items, None
    cleaner = Cleaner(rules)
    cleaner.fit(lambda: map(record, reread()))
    return cleaner.filter(items, record=record), cleaner


def clean_records(records: Sequence[dict], *, rules: Sequence[Rule] | None = None,
                  keep_examples: int = 3) -> tuple[list[dict], CleanReport]:
    """Apply `rules` (default: `recipe_rules()`) as stages to records in memory; returns (kept records in input
    order, report)."""
    cleaner = Cleaner(recipe_rules() if rules is None else rules, keep_examples=keep_examples)
    cleaner.fit(lambda: records)
    kept = list(cleaner.filter(records))
    return kept, cleaner.report()


def text_length(record: dict) -> int:
    """Characters of text in a record (see `texts`)."""
    return sum(map(len, texts(record)))


def record_text(record: dict) -> str:
    """The text of a record for pattern, charset and near-duplicate rules (see `texts`), one string a line."""
    return "\n".join(texts(record))


def texts(record: dict) -> Iterator[str]:
    """A record's strings, the strings in its lists, and the `content` of the messages in them (chat records)."""
    for value in record.values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    item = item.get("content")
                if isinstance(item, str):
                    yield item


def preview(record: dict, width: int = 48) -> str:
    """A one-line glimpse of a record: its title (or first text field), else its JSON, cut to `width`."""
    name = record.get("title") or record.get("text")
    text = repr(name) if isinstance(name, str) else json.dumps(record, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."
