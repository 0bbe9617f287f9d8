"""An endless, deterministic, resumable stream of micro-batches.

    loader = BatchLoader(examples, strategy="bfd", rows=8, max_length=2048, pad_id=tok.pad_token_id, seed=0)
    batch = next(loader)                  # a Batch of CPU tensors
    saved = loader.state_dict()           # {"epoch": 0, "batch_index": 1, ...}
    loader.load_state_dict(saved)         # a new loader over the same data then yields exactly what follows

Epoch e is planned by `optrush.data.pack.plan_batches` with order seed `seed + e` (or no shuffling at all when
`shuffle=False`), so the whole stream is a function of (examples, settings, seed) and a position in it is just
(epoch, batch index): resuming re-plans that epoch and skips to the index without collating anything.

Data parallelism: rank r of `world_size` takes micro-batches r, r + world_size, r + 2 * world_size, ... of each
epoch's plan. The plan's tail of `len(plan) % world_size` micro-batches is skipped on every rank, so all ranks run
the same number of micro-batches per epoch (a rank with no batch would stall the others' collectives); a
different seed next epoch puts different examples in that tail.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from optrush.data.batch import Batch
from optrush.data.formats import Example
from optrush.data.pack import collate, plan_batches

# settings that must match between the saving and the resuming loader for the stream to continue exactly
MUST_MATCH = ("strategy", "rows", "max_length", "seed", "shuffle", "rank", "world_size", "num_examples",
              "lengths_crc32")


class BatchLoader:
    def __init__(self, examples: list[Example], *, strategy: str, rows: int, max_length: int, pad_id: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.examples = examples
        self.strategy, self.rows, self.max_length, self.pad_id = strategy, rows, max_length, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.lengths = [len(example) for example in examples]
        self.epoch, self.batch_index = 0, 0
        self.plan = self.plan_epoch(0)
        if not self.plan:
            raise ValueError(f"{len(examples)} examples make fewer than world_size={world_size} micro-batches of "
                             f"{rows} rows: use more data, fewer rows (train.micro_batch_size) or fewer ranks")

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (the same for every epoch and every rank)."""
        return len(self.plan)

    def plan_epoch(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches of `epoch` (rows of example indices)."""
        plan = plan_batches(self.lengths, strategy=self.strategy, rows=self.rows, max_length=self.max_length,
                            order_seed=self.seed + epoch if self.shuffle else None)
        usable = len(plan) - len(plan) % self.world_size
        return plan[self.rank:usable:self.world_size]

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> Batch:
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
        for key in MUST_MATCH:
            if state.get(key) != mine[key]:
                raise ValueError(f"the saved data-loader state has {key}={state.get(key)!r} but this run has "
                                 f"{mine[key]!r}: resume with the same data and data/train settings, or start "
                                 "fresh (checkpoint.resume=never)")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])
        self.plan = self.plan_epoch(self.epoch)

    def settings(self) -> dict:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        return {"strategy": self.strategy, "rows": self.rows, "max_length": self.max_length, "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
                "num_examples": len(self.examples), "lengths_crc32": zlib.crc32(lengths.tobytes())}


def pinned(batch: Batch) -> Batch:
    """The batch in page-locked memory, so `batch.to("cuda", non_blocking=True)` overlaps with compute."""
    def pin(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.pin_memory()

    return Batch(input_ids=pin(batch.input_ids), labels=pin(batch.labels), position_ids=pin(batch.position_ids),
                 document_ids=pin(batch.document_ids), attention_lengths=pin(batch.attention_lengths))
