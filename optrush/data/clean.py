"""Record cleaning: composable rules that count what they drop and keep a few dropped examples to show.

    kept, report = clean_records(records)                      # the default recipe rules
    kept, report = clean_records(records, rules=[NonEmpty(fields=("text",)), ExactDuplicates()])
    print(report.format())

A rule has a `name`, `fit(records)` (a first pass over the records that reached it, for rules that need corpus
statistics such as ingredient frequencies) and `reject(record) -> reason | None`. Rules run as stages in the
given order: each sees only the records the previous ones kept, and each dropped record is counted under the first
rule that rejected it. Nothing is dropped without being counted.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


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


def preview(record: dict, width: int = 48) -> str:
    """A one-line glimpse of a record: its title (or first text field), else its JSON, cut to `width`."""
    name = record.get("title") or record.get("text")
    text = repr(name) if isinstance(name, str) else json.dumps(record, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 3] + "..."
