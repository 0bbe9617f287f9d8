"""Tokenized examples: `Example` (one example's int32 arrays) and `Examples` (many, back to back in flat arrays).

    example = Example(input_ids=[1, 5, 6], labels=[-100, 6, 2])
    store = Examples.from_examples(encode_records(...))   # packs chunk by chunk
    store[i]                        # an Example whose arrays are views into the store (no copy)
    store.lengths                   # int64 positions per example
    train, held = store.select(mask), store.select(~mask)

An `Examples` store holds `tokens` and `labels` (int32, every example's input ids / labels back to back) and
`offsets` (int64, n + 1 example boundaries): about 8 bytes per token, against ~75 for two Python lists of ints
per example (each id an 8-byte pointer to a 28-byte int object, twice). That is what lets a 2M-record corpus
(~360M tokens) fit in memory; the tokenize-once cache (`optrush.data.cache`) writes the same three arrays and
loads them memory-mapped. `Example.input_ids` / `.labels` still return Python lists, for code that reads one
example; code that reads many (`optrush.data.pack.collate`) uses the arrays.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from optrush.data.batch import IGNORE_INDEX

PACK_CHUNK = 4096
"""Examples gathered before they are copied into one pair of chunk arrays (bounds the per-example overhead)."""


class Example:
    """One tokenized example: `input_array` (model inputs) and `label_array` (targets, already shifted;
    IGNORE_INDEX where nothing is trained), int32 arrays of the same length."""
    __slots__ = ("input_array", "label_array")

    def __init__(self, input_ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray):
        self.input_array = np.asarray(input_ids, dtype=np.int32)
        self.label_array = np.asarray(labels, dtype=np.int32)
        if self.input_array.shape != self.label_array.shape or self.input_array.ndim != 1:
            raise ValueError(f"input ids {self.input_array.shape} and labels {self.label_array.shape} must be "
                             "1-D and of the same length")

    @property
    def input_ids(self) -> list[int]:
        return self.input_array.tolist()

    @property
    def labels(self) -> list[int]:
        return self.label_array.tolist()

    def __len__(self) -> int:
        return len(self.input_array)

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.label_array != IGNORE_INDEX))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Example):
            return NotImplemented
        return (np.array_equal(self.input_array, other.input_array)
                and np.array_equal(self.label_array, other.label_array))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Example(input_ids={self.input_ids}, labels={self.labels})"


class Examples(Sequence[Example]):
    """Many examples in three flat arrays (see the module docstring); indexing gives `Example` views."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        if len(tokens) != len(labels) or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError(f"inconsistent example arrays: {len(tokens)} tokens, {len(labels)} labels, offsets "
                             f"from {offsets[0]} to {offsets[-1]}")
        self.tokens, self.labels, self.offsets = tokens, labels, offsets

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> Examples:
        """Pack examples (any iterable; consumed once) into a store, PACK_CHUNK examples at a time."""
        parts: list[Examples] = []
        chunk: list[Example] = []
        for example in examples:
            chunk.append(example)
            if len(chunk) == PACK_CHUNK:
                parts.append(cls._pack(chunk))
                chunk = []
        if chunk or not parts:
            parts.append(cls._pack(chunk))
        return parts[0] if len(parts) == 1 else cls.concat(parts)

    @classmethod
    def _pack(cls, examples: list[Example]) -> Examples:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in examples], out=offsets[1:])
        if not examples:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), offsets)
        return cls(np.concatenate([e.input_array for e in examples]),
                   np.concatenate([e.label_array for e in examples]), offsets)

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        """One store holding the examples of `parts` in order (a copy)."""
        if not parts:
            return cls.from_examples([])
        ends = np.cumsum([len(p.tokens) for p in parts])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + (end - len(p.tokens)) for p, end in zip(parts, ends)])
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate([p.labels for p in parts]),
                   offsets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("Examples supports only contiguous slices")
            stop = max(start, stop)
            a, b = int(self.offsets[start]), int(self.offsets[stop])
            return Examples(self.tokens[a:b], self.labels[a:b], self.offsets[start:stop + 1] - a)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return Example(self.tokens[a:b], self.labels[a:b])

    def __iter__(self) -> Iterator[Example]:
        offsets = self.offsets.tolist()
        for a, b in zip(offsets, offsets[1:]):
            yield Example(self.tokens[a:b], self.labels[a:b])

    def __add__(self, other: Examples) -> Examples:
        return Examples.concat([self, other])

    def __eq__(self, other: object) -> bool:
        """Equal to another store, or to a list of `Example`s, holding the same examples in the same order."""
        if isinstance(other, Examples):
            return (np.array_equal(self.offsets, other.offsets) and np.array_equal(self.tokens, other.tokens)
                    and np.array_equal(self.labels, other.labels))
        if isinstance(other, list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {self.num_tokens:,} tokens)"

    @property
    def lengths(self) -> np.ndarray:
        """Positions per example (int64)."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_trained(self) -> int:
        """Targets that carry loss, over all examples (counted in slices: no full-size temporary)."""
        step = 1 << 24
        return sum(int(np.count_nonzero(self.labels[a:a + step] != IGNORE_INDEX))
                   for a in range(0, len(self.labels), step))

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.labels.nbytes + self.offsets.nbytes

    def select(self, keep: np.ndarray) -> Examples:
        """The examples where the boolean array `keep` is True, in order (a copy)."""
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != len(self):
            raise ValueError(f"select: mask of {len(keep)} for {len(self)} examples")
        lengths = self.lengths[keep]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        token_mask = np.repeat(keep, self.lengths)
        return Examples(self.tokens[token_mask], self.labels[token_mask], offsets)


def lengths_of(items: Sequence) -> np.ndarray:
    """int64 lengths of a sequence of sized items (an `Examples` store answers without building views)."""
    if isinstance(items, Examples):
        return items.lengths
    return np.fromiter(map(len, items), dtype=np.int64, count=len(items))
