"""Record cleaning: composable rules that count what they drop and keep a few dropped examples to show.

    kept, report = clean_records(records)                      # the default recipe rules
    kept, report = clean_records(records, rules=[NonEmpty(fields=("text",)), ExactDuplicates()])
    kept, report = clean_records(records, rules=rules_from_config(cfg.data, tokenizer))   # data.clean.*
    print(report.format())

A rule has a `name`, `fit(records)` (a first pass over the records that reached it, for rules that need corpus
statistics such as ingredient frequencies) and `reject(record) -> reason | None`. Rules run as stages in the
given order: each sees only the records the previous ones kept, and each dropped record is counted under the first
rule that rejected it. Nothing is dropped without being counted.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from optrush.config.schema import DataConfig
from optrush.data.reader import DataError


class Rule(Protocol):
    name: str

    def fit(self, records: Sequence[dict]) -> None: ...

    def reject(self, record: dict) -> str | None: ...


class NonEmpty:
    """Drop records where a field is missing, blank, or an empty list."""
    name = "empty"

    def __init__(self, *, fields: Sequence[str] = ("title", "ingredients", "directions")):
        self.fields = tuple(fields)

    def fit(self, records: Sequence[dict]) -> None:
        pass

    def reject(self, record: dict) -> str | None:
        for name in self.fields:
            value = record.get(name)
            if value is None:
                return f"no {name!r} field"
            if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
                return f"{name!r} is empty"
        return None


class ExactDuplicates:
    """Keep the first of records that are equal field for field (16-byte digests keep memory small)."""
    name = "duplicate"

    def __init__(self):
        self.seen: set[bytes] = set()

    def fit(self, records: Sequence[dict]) -> None:
        self.seen = set()

    def reject(self, record: dict) -> str | None:
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(),
                                 digest_size=16).digest()
        if digest in self.seen:
            return "same as an earlier record"
        self.seen.add(digest)
        return None


class TooLong:
    """Drop records with more than `max_chars` characters of text or more than `max_steps` items in
    `steps_field` (for recipes: direction steps)."""
    name = "too_long"

    def __init__(self, *, max_chars: int = 12_000, max_steps: int = 100, steps_field: str = "directions"):
        self.max_chars, self.max_steps, self.steps_field = max_chars, max_steps, steps_field

    def fit(self, records: Sequence[dict]) -> None:
        pass

    def reject(self, record: dict) -> str | None:
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

    def __init__(self, *, min_count: int = 2, field: str = "NER"):
        self.min_count, self.field = min_count, field
        self.counts: Counter[str] = Counter()

    def fit(self, records: Sequence[dict]) -> None:
        self.counts = Counter()
        for record in records:
            self.counts.update(set(record.get(self.field) or ()))

    def reject(self, record: dict) -> str | None:
        for item in record.get(self.field) or ():
            if self.counts[item] < self.min_count:
                return f"{item!r} is in {self.counts[item]} record(s) < {self.min_count}"
        return None


class Pattern:
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

    def fit(self, records: Sequence[dict]) -> None:
        pass

    def reject(self, record: dict) -> str | None:
        text = record_text(record)
        for pattern in self.patterns:
            if match := pattern.search(text):
                return f"matches {pattern.pattern!r} at {match.group()[:24]!r}"
        return None


class Charset:
    """Drop records holding a character outside `chars`, a regex character class such as `[\\x00-\\x7f]`."""
    name = "charset"

    def __init__(self, *, chars: str):
        try:
            self.outside = re.compile(f"[^{chars[1:-1]}]" if chars.startswith("[") and chars.endswith("]")
                                      else f"[^{chars}]")
        except re.error as err:
            raise DataError(f"data.clean.charset={chars!r} is not a valid regex character class ({err}); "
                            "write e.g. [\\x00-\\x7f]") from None

    def fit(self, records: Sequence[dict]) -> None:
        pass

    def reject(self, record: dict) -> str | None:
        if match := self.outside.search(record_text(record)):
            return f"character {match.group()!r} (U+{ord(match.group()):04X}) is outside the charset"
        return None


class Bounds:
    """Drop records whose measure (characters, list items, tokens) is below `low` or above `high` (0: no bound)."""

    def __init__(self, *, name: str, unit: str, measure, low: int = 0, high: int = 0, prepare=None):
        self.name, self.unit, self.measure, self.low, self.high, self.prepare = name, unit, measure, low, high, prepare

    def fit(self, records: Sequence[dict]) -> None:
        if self.prepare is not None:
            self.prepare(records)

    def reject(self, record: dict) -> str | None:
        value = self.measure(record)
        if self.low and value < self.low:
            return f"{value} {self.unit} < {self.low}"
        if self.high and value > self.high:
            return f"{value} {self.unit} > {self.high}"
        return None


class TokenCounter:
    """Token counts of records as `data.format` renders them (BOS included, as `len(example)` counts), computed in
    batched tokenizer calls by `prepare` and looked up by record identity."""

    def __init__(self, *, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.counts: dict[int, int] = {}

    def prepare(self, records: Sequence[dict]) -> None:
        self.counts = dict(zip(map(id, records), token_lengths(records, cfg=self.cfg, tokenizer=self.tokenizer)))

    def __call__(self, record: dict) -> int:
        return self.counts[id(record)]


def token_lengths(records: Sequence[dict], *, cfg: DataConfig, tokenizer, chunk: int = 1024) -> list[int]:
    """Positions each record takes as an Example (BOS + prompt + completion tokens), in record order."""
    from optrush.data.chat import chat_segments
    from optrush.data.dataset import chat_examples, tokenize
    from optrush.data.formats import render

    bos = 0 if tokenizer.bos_token_id is None else 1
    out: list[int] = []
    for start in range(0, len(records), chunk):
        if cfg.format == "chat":
            segments = [chat_segments(r, cfg=cfg, tokenizer=tokenizer, where=f"record {start + k + 1}")
                        for k, r in enumerate(records[start:start + chunk])]
            out += [len(example) for example in chat_examples(segments, tokenizer)]
            continue
        texts = [render(r, cfg=cfg, where=f"record {start + k + 1}")
                 for k, r in enumerate(records[start:start + chunk])]
        prompts = tokenize([p for p, _ in texts], tokenizer)
        completions = tokenize([c for _, c in texts], tokenizer)
        out += [bos + len(p) + len(c) for p, c in zip(prompts, completions)]
    return out


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
        counter = TokenCounter(cfg=cfg, tokenizer=tokenizer)
        rules.append(Bounds(name="tokens", unit="tokens", measure=counter, low=c.min_tokens, high=c.max_tokens,
                            prepare=counter.prepare))
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


def clean_records(records: Sequence[dict], *, rules: Sequence[Rule] | None = None,
                  keep_examples: int = 3) -> tuple[list[dict], CleanReport]:
    """Apply `rules` (default: `recipe_rules()`) as stages; returns (kept records in input order, report)."""
    rules = recipe_rules() if rules is None else list(rules)
    kept = list(records)
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for rule in rules:
        rule.fit(kept)
        survivors = []
        shown = examples.setdefault(rule.name, [])
        count = 0
        for record in kept:
            reason = rule.reject(record)
            if reason is None:
                survivors.append(record)
                continue
            count += 1
            if len(shown) < keep_examples:
                shown.append(f"{preview(record)}: {reason}")
        dropped[rule.name] = dropped.get(rule.name, 0) + count
        kept = survivors
    return kept, CleanReport(total=len(records), kept=len(kept), dropped=dropped, examples=examples)


def text_length(record: dict) -> int:
    """Characters of text in a record: its strings and the strings in its lists."""
    total = 0
    for value in record.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(item) for item in value if isinstance(item, str))
    return total


def record_text(record: dict) -> str:
    """The text of a record for pattern, charset and near-duplicate rules: its strings and list items, one a line."""
    parts = []
    for value in record.values():
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [item for item in value if isinstance(item, str)]
    return "\n".join(parts)


def preview(record: dict, width: int = 48) -> str:
    """A one-line glimpse of a record: its title (or first text field), else its JSON, cut to `width`."""
    name = record.get("title") or record.get("text")
    text = repr(name) if isinstance(name, str) else json.dumps(record, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."
