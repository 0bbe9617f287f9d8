"""Plain text out of a corpus file, for tokenizer training: `.txt` (one document per line) or JSONL/JSON (a column)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from optrush.data.reader import DataError, read_records


def corpus_texts(path: str | Path, *, column: str = "text") -> Iterator[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
        return
    for line_no, record in read_records(path):
        if column not in record:
            raise DataError(f"{path}:{line_no}: no column {column!r} (columns: {', '.join(record)}); "
                            "pass --column NAME")
        yield str(record[column])
