"""An endless, deterministic, resumable stream of micro-batches.

    loader = BatchLoader(examples, strategy="bfd", rows=8, max_length=2048, pad_id=tok.pad_token_id, seed=0)
    batch = next(loader)                  # a Batch of CPU tensors
    saved = loader.state_dict()           # {"epoch": 0, "batch_index": 1, ...}
    loader.load_state_dict(saved)         # a new loader over the same data then yields exactly what follows

Epoch e is planned by `optrush.data.pack.plan_batches` with order seed `seed + e` (or no shuffling at all when
`shuffle=False`), so the whole stream is a function of (examples, settings, seed) and a position in it is just
(epoch, batch index): resuming re-plans that epoch and skips to the index without collating anything.
`batch_tokens` > 0 sizes micro-batches by a padded-token budget instead of `rows` (see `optrush.data.pack`).

Prefetch (`prefetch=k > 0`): a background thread plans and collates (and pins) up to k batches ahead, so the
next batch is ready while the accelerator runs the current one. It walks the same deterministic stream from the
loader's position, and the loader's position (hence `state_dict`) only moves when a batch is taken, so prefetching
changes neither the batches nor the resume point. `load_state_dict` stops the thread and restarts it from the
loaded position; the thread also stops when the loader is garbage-collected or `close()`d.

Data parallelism: rank r of `world_size` takes micro-batches r, r + world_size, r + 2 * world_size, ... of each
epoch's plan. The plan's tail of `len(plan) % world_size` micro-batches is skipped on every rank, so all ranks run
the same number of micro-batches per epoch (a rank with no batch would stall the others' collectives); a
different seed next epoch puts different examples in that tail. With `grad_accum` g, optimizer step k of the run
therefore trains exactly micro-batches [k*g*W, (k+1)*g*W) of the epoch's plan, spread over the W ranks: the same
global batch as one process with grad_accum g*W, and every rank gets whole planned micro-batches (with `bfd`, full
rows of `max_length` tokens), so the ranks' token budgets stay balanced.

The saved position is valid at any world size: loading a state saved by W ranks (at per-rank index i) into a loader
of W' ranks continues at per-rank index i*W/W' (the global count of micro-batches taken is what matters, and it
must divide by W'; keep the global batch, e.g. grad_accum*W, the same when resuming on a different world size).
"""
from __future__ import annotations

import queue
import threading
import weakref
import zlib
from functools import partial

import numpy as np
import torch

from optrush.data.batch import Batch
from optrush.data.examples import Example, lengths_of
from optrush.data.pack import collate, plan_batches

# settings that must match between the saving and the resuming loader for the stream to continue exactly
# (not rank and world_size: a position converts between world sizes, see load_state_dict)
# (each with what sets it, for the error message)
MUST_MATCH = {"strategy": "data.packing", "rows": "train.micro_batch_size", "batch_tokens": "data.batch_tokens",
              "max_length": "data.max_length", "seed": "train.seed", "shuffle": "data.shuffle",
              "num_examples": "the number of training examples",
              "lengths_crc32": "the training examples' token lengths"}
SAVED_BEFORE = {"batch_tokens": 0}
"""Settings newer than some saved states, and the value a state saved without them had."""


class BatchLoader:
    def __init__(self, examples: list[Example], *, strategy: str, rows: int, max_length: int, pad_id: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 prefetch: int = 0, batch_tokens: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.examples = examples
        self.strategy, self.rows, self.max_length, self.pad_id = strategy, rows, max_length, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.batch_tokens = batch_tokens
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch = prefetch
        self._worker: tuple[threading.Thread, threading.Event, queue.Queue] | None = None
        self.lengths = self.item_lengths(examples)
        self.epoch, self.batch_index = 0, 0
        self.plan = self.plan_epoch(0)
        if not self.plan:
            size = (f"{batch_tokens} tokens (data.batch_tokens)" if batch_tokens
                    else f"{rows} rows (train.micro_batch_size)")
            raise ValueError(f"{len(examples)} examples make fewer than world_size={world_size} micro-batches of "
                             f"{size}: use more data, smaller micro-batches or fewer ranks")

    def item_lengths(self, examples) -> np.ndarray:
        """The positions each item takes in a row, what the epochs are planned by."""
        return lengths_of(examples)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (the same for every epoch and every rank)."""
        return len(self.plan)

    def plan_epoch(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of `epoch` (rows of example indices)."""
        plan = plan_batches(self.lengths, strategy=self.strategy, rows=self.rows, max_length=self.max_length,
                            order_seed=self.seed + epoch if self.shuffle else None, batch_tokens=self.batch_tokens)
        usable = len(plan) - len(plan) % self.world_size
        # what this epoch leaves out, reported at start-up: data is never skipped silently
        self.left_out = (len(plan) - usable, sum(len(row) for micro in plan[usable:] for row in micro))
        return plan[self.rank:usable:self.world_size]

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> Batch:
        if self.prefetch > 0:
            return self._next_prefetched()
        if self.batch_index == len(self.plan):
            self.epoch, self.batch_index = self.epoch + 1, 0
            if self.shuffle:  # unshuffled epochs are all the same plan
                self.plan = self.plan_epoch(self.epoch)
        rows = self.plan[self.batch_index]
        self.batch_index += 1
        batch = collate([[self.examples[i] for i in row] for row in rows], packed=self.strategy == "bfd",
                        pad_id=self.pad_id, max_length=self.max_length)
        return pinned(batch) if self.pin_memory else batch

    def state_dict(self) -> dict:
        """The position (the next batch is `batch_index` of `epoch`) and the settings it is only valid for."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, **self.settings()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.settings()
        for key, source in MUST_MATCH.items():
            saved = state.get(key, SAVED_BEFORE.get(key))
            if saved != mine[key]:
                raise ValueError(f"{source} differs from the checkpoint's: it saved {key}={saved!r}, this run has "
                                 f"{mine[key]!r}; resume with the same data and data/train settings, or start "
                                 "a new run in a new output_dir (checkpoint.resume=never)")
        taken = int(state["batch_index"]) * int(state["world_size"])  # micro-batches of the epoch all ranks took
        if taken % self.world_size:
            raise ValueError(f"the saved data-loader state is {taken} micro-batches into epoch {state['epoch']} "
                             f"(saved by {state['world_size']} ranks), which {self.world_size} ranks cannot split "
                             "evenly: resume on a world size dividing it, with the same global batch")
        self.close()
        self.epoch = int(state["epoch"])
        self.plan = self.plan_epoch(self.epoch)
        # past this world size's usable part of the epoch: the rest is its skipped tail, so the epoch is done
        self.batch_index = min(taken // self.world_size, len(self.plan))

    def close(self) -> None:
        """Stop the prefetch thread (if any) and drop what it prepared; the next batch restarts it."""
        if self._worker is not None:
            thread, stop, ready = self._worker
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._worker = None

    def _next_prefetched(self) -> Batch:
        if self._worker is None:
            stop, ready = threading.Event(), queue.Queue(maxsize=self.prefetch)
            thread = threading.Thread(target=_produce, daemon=True, name="optrush-prefetch",
                                      args=(weakref.WeakMethod(self.plan_epoch),
                                            partial(_collate_rows, self.examples, packed=self.strategy == "bfd",
                                                    pad_id=self.pad_id, max_length=self.max_length,
                                                    pin=self.pin_memory), stop, ready,
                                            self.epoch, self.batch_index, self.plan, self.shuffle))
            weakref.finalize(self, stop.set)
            thread.start()
            self._worker = (thread, stop, ready)
        epoch, index, plan, batch = self._worker[2].get()
        if isinstance(batch, BaseException):
            self._worker = None
            raise batch
        self.epoch, self.batch_index, self.plan = epoch, index, plan
        return batch


    def settings(self) -> dict:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        return {"strategy": self.strategy, "rows": self.rows, "batch_tokens": self.batch_tokens,
                "max_length": self.max_length, "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
                "num_examples": len(self.examples), "lengths_crc32": zlib.crc32(lengths.tobytes())}


def _collate_rows(examples: list[Example], rows: list[list[int]], *, packed: bool, pad_id: int, max_length: int,
                  pin: bool) -> Batch:
    batch = collate([[examples[i] for i in row] for row in rows], packed=packed, pad_id=pad_id, max_length=max_length)
    return pinned(batch) if pin else batch


def _produce(planner: weakref.WeakMethod, collate_rows, stop: threading.Event, ready: queue.Queue, epoch: int,
             index: int, plan: list, shuffle: bool) -> None:
    """The prefetch thread: the stream from (epoch, index) onwards, as (position after, plan, batch) items.
    It holds the loader only weakly (through `planner`; `collate_rows` is a plain function of the examples) so an
    abandoned loader can be collected, which stops the thread."""
    try:
        while not stop.is_set():
            if index == len(plan):
                epoch, index = epoch + 1, 0
                if shuffle:
                    plan_epoch = planner()
                    if plan_epoch is None:
                        return
                    plan = plan_epoch(epoch)
                    del plan_epoch  # a strong reference left in this frame would keep the loader alive
            rows = plan[index]
            index += 1
            item = (epoch, index, plan, collate_rows(rows))
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except Exception as err:  # hand the error to the consumer, which raises it
        ready.put((epoch, index, plan, err))


def pinned(batch: Batch) -> Batch:
    """The batch in page-locked memory, so `batch.to("cuda", non_blocking=True)` overlaps with compute."""
    def pin(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.pin_memory()

    return Batch(input_ids=pin(batch.input_ids), labels=pin(batch.labels), position_ids=pin(batch.position_ids),
                 document_ids=pin(batch.document_ids), attention_lengths=pin(batch.attention_lengths))
