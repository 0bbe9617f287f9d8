"""Records out of data files, with errors that name the file and line.

    for line_no, record in read_records("train.jsonl"):   # JSONL, or a JSON array of objects
        ...

`read_jsonl` streams a JSON-lines file (blank lines are skipped; numbers are 1-based line numbers). `read_json`
reads a file holding one JSON array of objects (numbers are 1-based item numbers). `read_records` picks between
them by the file's first non-blank character (`[` means a JSON array), not by its extension, because `.json` files
written by common tools (e.g. `datasets.Dataset.to_json`) are JSON lines. Every problem raises `DataError`, unless
a `rejects` sink is given (`optrush.data.sources.Rejects`, data.on_error=skip): then a bad line or item is recorded
there and skipped. Only a caller that honours data.on_error passes `read_jsonl(..., can_skip=True)` (as
`optrush.data.sources.iter_records` does), so a bad line's message suggests data.on_error=skip only where the user
can set it (not for `optrush score`). Parquet, CSV, text folders and saved HF datasets: `optrush.data.sources`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optrush.data.sources import Rejects


class DataError(ValueError):
    """Bad input data; the message names the file (and line or item) and says what to do."""


def relative_path_note(path: str | Path) -> str:
    """For a path not found: where a relative one was looked for (the working directory, not the config file's)."""
    return "" if Path(path).is_absolute() else f" (a relative path is taken from the working directory, {Path.cwd()})"


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(number, record) for every record of a JSONL file or a JSON array file (see the module docstring); its
    callers have no data.on_error, so errors do not suggest it."""
    path = _existing(path)
    return read_json(path) if is_json_array(path) else read_jsonl(path)


def read_jsonl(path: str | Path, *, rejects: Rejects | None = None,
               can_skip: bool = False) -> Iterator[tuple[int, dict]]:
    """Stream (line number, record) from a JSON-lines file, one object per line; blank lines are skipped.
    `can_skip`: the caller honours data.on_error, so an error may suggest data.on_error=skip."""
    path = _existing(path)
    with open(path, "rb") as f:  # bytes: a bad UTF-8 sequence is then reported with its line number
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = None
            except json.JSONDecodeError as err:
                skip = " (or set data.on_error=skip)" if can_skip and rejects is None else ""
                problem = (f"{path}:{line_no}: not valid JSON ({json_error_place(err)}); each line must hold "
                           f"one complete JSON object: fix or delete this line{skip}")
            except UnicodeDecodeError as err:
                problem = f"{path}:{line_no}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8"
            if problem is None and not isinstance(record, dict):
                problem = (f"{path}:{line_no}: expected a JSON object ({{\"column\": value, ...}}), got "
                           f"{_json_type(record)}; each line must hold one object")
            if problem is not None:
                if rejects is None:
                    raise DataError(problem)
                rejects.add(f"{path}:{line_no}", problem, line.decode("utf-8", errors="replace").rstrip("\n"))
                continue
            yield line_no, record


def json_error_place(err: json.JSONDecodeError) -> str:
    """What went wrong where, within one JSONL line. The decoder counts the line's own newline as the start of a
    second line, so an object left open was reported at "column 1" (of that empty second line): an error past the
    line's last character is reported at the end of the line instead."""
    text = err.doc.rstrip("\r\n")
    what = err.msg.removesuffix(" at")  # "Unterminated string starting at" + the place
    if err.pos >= len(text):
        return f"{what} at the end of the line, column {len(text) + 1}: is a closing brace, bracket or quote missing?"
    return f"{what} at column {err.colno}"


def read_json(path: str | Path, *, rejects: Rejects | None = None) -> Iterator[tuple[int, dict]]:
    """(item number, record) from a file holding one JSON array of objects (read whole: arrays cannot stream)."""
    path = _existing(path)
    try:
        items = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); fix the file, or "
                        "write one JSON object per line (JSONL)") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON lines, got {_json_type(items)}")
    return _objects(path, items, rejects)


def _objects(path: Path, items: list, rejects: Rejects | None) -> Iterator[tuple[int, dict]]:
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            problem = (f"{path} item {number}: {_json_type(item)} in the JSON array, expected an object "
                       "({\"column\": value, ...})")
            if rejects is None:
                raise DataError(problem)
            rejects.add(f"{path} item {number}", problem, item)
            continue
        yield number, item


def is_json_array(path: str | Path) -> bool:
    """Whether the file's first non-blank character is `[` (one JSON array rather than JSON lines)."""
    with open(_existing(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return chunk.lstrip().startswith(b"[")
    return False


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (give a JSONL file, one JSON object per line)")
    return path


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
             type(None): "null"}
    return names[type(value)]
