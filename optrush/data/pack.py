"""Batch planning (which examples share a micro-batch and a row) and collation into a `Batch`.

    plan = plan_batches([len(e) for e in examples], strategy="bfd", rows=8, max_length=2048, order_seed=0)
    batch = collate([[examples[i] for i in row] for row in plan[0]], packed=True, pad_id=pad, max_length=2048)

A plan is a list of micro-batches, each a list of rows, each a list of example indices.

- `none`: one example per row, `rows` consecutive examples per micro-batch (in index order, or in a permutation
  drawn from `order_seed`); `collate` right-pads each micro-batch to its longest row.
- `sorted`: one example per row, as `none`, but examples are sorted by length (equal lengths in a seeded order)
  and cut into micro-batches of `rows` neighbours, and the micro-batches are then shuffled (`order_seed`): little
  padding without packing, while the order of batches stays random.
- `bfd`: best-fit-decreasing bin packing (Johnson 1973): take examples longest first and put each into the open row
  with the least room that still fits it, else open a new row of `max_length` tokens. Whole examples are packed and
  never split, so no document is cut and no label crosses a document. Rows are then shuffled (`order_seed`) and
  grouped `rows` at a time. Equal lengths are taken in a seeded order, so different seeds pack different
  neighbours while the number of rows stays the same. `collate` pads every packed row to `max_length` and marks
  documents: `position_ids` restart at 0 per document and `document_ids` number them 0..k-1 (padding: -1).

Token budget (`batch_tokens` > 0, config `data.batch_tokens`): instead of a fixed `rows`, a micro-batch holds as
many rows as fit `batch_tokens` padded tokens, so short examples travel by the hundred and long ones a few at a
time (the padded-token budget of length-grouped SFT batching). `none` and `sorted` take the examples in the order
above and close a micro-batch when one more example would make rows x longest exceed the budget (`sorted` then
shuffles the micro-batches); `bfd` rows are all `max_length` wide, so the budget is `batch_tokens // max_length`
rows per micro-batch.

The last micro-batch of an unpacked plan may hold fewer rows; that of a `bfd` plan is filled up with rows of
padding, so packed micro-batches have one shape from the first to the last (no recompilation). Examples longer
than `max_length` are rejected here: the dataset truncates, drops or splits them first (`data.too_long`).
"""
from __future__ import annotations

import contextlib
import gc
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.examples import Example

STRATEGIES = ("none", "sorted", "bfd")


def plan_batches(lengths: Sequence[int], *, strategy: str, rows: int, max_length: int,
                 order_seed: int | None, batch_tokens: int = 0) -> list[list[list[int]]]:
    """Micro-batches -> rows -> example indices (see the module docstring); `batch_tokens` > 0 sizes micro-batches
    by padded tokens instead of `rows`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if rows < 1:
        raise ValueError(f"rows={rows}: a micro-batch needs at least one row")
    if batch_tokens and batch_tokens < max_length:
        raise ValueError(f"batch_tokens={batch_tokens} is below max_length={max_length}: a micro-batch must have "
                         "room for the longest example (data.batch_tokens >= data.max_length, or 0 = off)")
    if strategy == "bfd" and batch_tokens:
        rows = batch_tokens // max_length
    lens = np.asarray(lengths, dtype=np.int64)
    if len(lens) and (lens.min() < 1 or lens.max() > max_length):
        bad = int(np.flatnonzero((lens < 1) | (lens > max_length))[0])
        raise ValueError(f"example {bad} has {lengths[bad]} tokens; every example must have 1..{max_length} "
                         "(max_length) tokens: the dataset truncates, drops or splits longer ones first")
    rng = None if order_seed is None else np.random.default_rng(order_seed)
    with _gc_paused():
        return _plan(lens, strategy=strategy, rows=rows, max_length=max_length, rng=rng,
                     budget=0 if strategy == "bfd" else batch_tokens)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a plan builds millions of small lists: they hold no cycles, and
    the collector would rescan them again and again (planning 2M examples ran 5x slower with it on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(lens: np.ndarray, *, strategy: str, rows: int, max_length: int, rng: np.random.Generator | None,
          budget: int) -> list[list[list[int]]]:
    if strategy == "none":
        order = np.arange(len(lens)) if rng is None else rng.permutation(len(lens))
        if budget:
            return fill_budget(lens.tolist(), order.tolist(), budget=budget)
        packed = [[i] for i in order.tolist()]
    elif strategy == "sorted":
        tiebreak = np.arange(len(lens)) if rng is None else rng.permutation(len(lens))
        ranked = np.lexsort((tiebreak, lens)).tolist()
        if budget:
            plan = fill_budget(lens.tolist(), ranked, budget=budget)
        else:
            plan = [[[i] for i in ranked[start:start + rows]] for start in range(0, len(ranked), rows)]
        if rng is not None:
            plan = [plan[i] for i in rng.permutation(len(plan)).tolist()]
        return plan
    else:
        tiebreak = np.arange(len(lens)) if rng is None else rng.permutation(len(lens))
        packed = best_fit_decreasing(lens.tolist(), np.lexsort((tiebreak, -lens)).tolist(), capacity=max_length)
        if rng is not None:
            packed = [packed[i] for i in rng.permutation(len(packed)).tolist()]
    plan = [packed[start:start + rows] for start in range(0, len(packed), rows)]
    if strategy == "bfd" and plan and len(plan[-1]) < rows:
        # a packed micro-batch always has `rows` rows: a compiled model would recompile for a smaller last one,
        # inside the epoch (measured on an H100: about half the time of a 56-step epoch of the 1B shape)
        plan[-1] = plan[-1] + [[] for _ in range(rows - len(plan[-1]))]
    return plan


def fill_budget(lengths: list[int], order: list[int], *, budget: int) -> list[list[list[int]]]:
    """Examples taken in `order`, one per row, cut into micro-batches whose padded size (rows x longest row) stays
    within `budget` tokens: a micro-batch is closed when the next example would overflow it."""
    plan: list[list[list[int]]] = []
    micro: list[list[int]] = []
    longest = 0
    for item in order:
        widest = max(longest, lengths[item])
        if micro and widest * (len(micro) + 1) > budget:
            plan.append(micro)
            micro, widest = [], lengths[item]
        micro.append([item])
        longest = widest
    if micro:
        plan.append(micro)
    return plan


def best_fit_decreasing(lengths: list[int], order: list[int], *, capacity: int) -> list[list[int]]:
    """Pack items (taken in `order`, longest first) into bins of `capacity`; returns bins of item indices.

    Open bins are kept by remaining room: `by_room[r]` lists the bins with exactly r tokens free and `rooms` is
    the sorted list of those r, so the best fit is one bisect away (O(log R) per item, R <= capacity)."""
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    for item in order:
        need = lengths[item]
        k = bisect_left(rooms, need)
        if k == len(rooms):
            target, left = len(bins), capacity - need
            bins.append([item])
        else:
            room = rooms[k]
            candidates = by_room[room]
            target, left = candidates.pop(), room - need
            if not candidates:
                del by_room[room]
                rooms.pop(k)
            bins[target].append(item)
        if left:
            if left in by_room:
                by_room[left].append(target)
            else:
                by_room[left] = [target]
                insort(rooms, left)
    return bins


def collate(examples: list[list[Example]], *, packed: bool, pad_id: int, max_length: int) -> Batch:
    """Rows of examples -> a `Batch` of CPU tensors. Unpacked: one example per row, right-padded to the longest
    row. Packed: several per row, every row padded to `max_length`, with per-document positions and ids.
    Filled with numpy slice copies from the examples' int32 arrays (no per-token Python work)."""
    lengths = [sum(len(example) for example in row) for row in examples]
    if max(lengths) > max_length:
        raise ValueError(f"a row holds {max(lengths)} tokens > max_length={max_length}")
    if not packed:
        if any(len(row) != 1 for row in examples):
            raise ValueError("unpacked batches hold exactly one example per row")
        width = max(lengths)
    else:
        width = max_length
    shape = (len(examples), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    documents = np.full(shape, -1, dtype=np.int32)
    steps = np.arange(width, dtype=np.int64)
    for r, row in enumerate(examples):
        start = 0
        for d, example in enumerate(row):
            end = start + len(example)
            input_ids[r, start:end] = example.input_array
            labels[r, start:end] = example.label_array
            positions[r, start:end] = steps[:end - start]
            documents[r, start:end] = d
            start = end
    if not packed:
        return Batch(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                     position_ids=torch.arange(width).expand(len(examples), width).clone(),
                     attention_lengths=torch.tensor(lengths))
    return Batch(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                 position_ids=torch.from_numpy(positions), document_ids=torch.from_numpy(documents))
