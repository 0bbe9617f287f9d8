"""Plain text out of a corpus file, for tokenizer training: `.txt` (one document per line) or JSONL/JSON (a column)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from optrush.data.reader import DataError, read_records


def corpus_texts(path: str | Path, *, column: str = "text") -> Iterator[str]:
    """The texts of the corpus file at `path`; raises DataError, naming the file, when it holds none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    found = 0
    for text in (text_lines(path) if path.suffix == ".txt" else column_texts(path, column)):
        found += bool(text.strip())
        yield text
    if not found:
        what = "no line of text" if path.suffix == ".txt" else f"no record with text in column {column!r}"
        raise DataError(f"{path} holds {what}: nothing to train a tokenizer on; give a corpus of text")


def text_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f if line.strip())


def column_texts(path: Path, column: str) -> Iterator[str]:
    for line_no, record in read_records(path):
        if column not in record:
            raise DataError(f"{path}:{line_no}: no column {column!r} (columns: {', '.join(record)}); "
                            "pass --column NAME")
        yield str(record[column])
