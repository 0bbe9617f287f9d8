"""Files that appear whole or not at all.

    with written_whole(path) as partial:
        partial.write_text(text)      # or torch.save(obj, partial), a writer, ...
    # `path` now holds the whole file; had the block raised, neither `path` nor `partial` would be changed or left

A process killed mid-write (torchrun stopping a rank, Ctrl-C, out of memory), or a write that fails validation,
must not leave a file that looks complete to the next reader: a cache, a cleaned dataset, a metrics log.
(Checkpoint and model directories have their own temporary-directory renames in train/checkpoint.py and
models/io.py.)
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A path beside `path` (`<name>.partial`) for the block to write; renamed onto `path` in one step when the
    block ends without an error, removed when it raises."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
