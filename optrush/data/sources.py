"""Records from any supported data source, streamed in bounded memory, each with a place that names file and row.

    for where, record in iter_records("train.parquet"):      # where = "train.parquet row 17"
        ...
    rejects = Rejects("bad.jsonl")                            # data.on_error=skip: bad rows go here, counted
    for where, record in iter_records("train.jsonl", rejects=rejects): ...

Sources, chosen by what the path is:

- a `.jsonl` / `.json` file: JSON lines, or one JSON array (`optrush.data.reader`); places are `file:line`.
- a `.parquet` file: read one row group batch at a time (pyarrow); places are `file row n` (1-based).
- a `.csv` / `.tsv` file: streamed in blocks (pyarrow.csv, header row first); places are `file row n` (1-based,
  the header not counted). A row with the wrong number of fields is a bad row (`file line n`).
- a directory written by `datasets.Dataset.save_to_disk` (it holds `state.json`): its Arrow files are streamed with
  pyarrow, so the `datasets` package is not needed; places are `dir row n`.
- any other directory: plain text, one document per file (`{"text": contents, "file": relative path}`), files in
  sorted order, hidden files skipped; places are the file names.
- a `.txt` / `.md` file: plain text, the whole file one document, as one file of a text folder
  (`{"text": contents, "file": its name}`); its place is the file name. Text sources hold documents, not records
  with columns: only `data.format=text` reads them (`optrush.data.dataset.read_source` says so for other formats).
- `hf://datasets/OWNER/NAME`, optionally followed by `?config=CONFIG&split=SPLIT&revision=REV` (any of them, split
  `train` by default): a
  dataset on the Hugging Face hub, read with `datasets.load_dataset` (downloaded once into the HF cache, then
  memory-mapped). It needs the optional `datasets` package and network access, or a copy already in the HF cache
  with HF_DATASETS_OFFLINE=1; otherwise the error names data.path and says how to get a local copy. Places are
  `hf://datasets/OWNER/NAME row n`.

Without `rejects`, a bad row raises `DataError` naming the file and line or row. With it, the row is recorded
(count, a few messages for the report, every row in the rejects JSONL file) and reading goes on. A source read more
than once (cleaning rules that need a fit pass) records its bad rows in one pass only: the others get `Recounted`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from optrush.data.reader import DataError, is_json_array, read_json, read_jsonl, relative_path_note

BATCH_ROWS = 1024
HUB_PREFIX = "hf://datasets/"
HUB_OPTIONS = ("config", "split", "revision")
TEXT_SUFFIXES = (".txt", ".md")
"""Files read as one plain-text document each (a text folder reads any file that way)."""


class Rejects:
    """Bad rows skipped under `data.on_error=skip`: counted, the first few messages kept, all written to `path`."""

    def __init__(self, path: str | Path, *, keep: int = 3):
        self.path, self.keep = Path(path), keep
        self.count = 0
        self.messages: list[str] = []
        self._file = None

    def add(self, where: str, error: str, row: object = None) -> None:
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(error)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps({"where": where, "error": error, "row": row}, ensure_ascii=False, default=str)
                         + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Recounted:
    """A `Rejects` stand-in for the extra passes over a source (cleaning fits, checks): the bad rows they meet are
    recorded and counted by the one pass that holds the real `Rejects`, so here they are only skipped."""

    def add(self, where: str, error: str, row: object = None) -> None:
        pass


def iter_records(path: str | Path, *, rejects: Rejects | Recounted | None = None,
                 key: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of the source at `path` (see the module docstring). Its callers honour
    data.on_error, so without `rejects` an error suggests data.on_error=skip. `key`: the config key that names
    `path` (data.path, data.eval_path), for the error when nothing is there."""
    if (hub := parse_hub_path(path)) is not None:
        return read_hub_dataset(hub)
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir())) or "none"
            raise DataError(f"{path} is a saved DatasetDict: point data.path at one split directory inside it "
                            f"(splits: {splits})")
        return read_saved_dataset(path) if (path / "state.json").is_file() else read_text_folder(path, rejects)
    if not path.is_file():
        what = f"{key}={path}: no such file or directory" if key else f"data not found: {path}"
        raise DataError(f"{what}{relative_path_note(path)}: give a JSONL, JSON, Parquet or CSV file, a .txt or .md "
                        "text file, a folder of text files, or a directory written by datasets' save_to_disk")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return read_text_file(path, rejects)
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, rejects, delimiter="\t" if suffix == ".tsv" else ",")
    if is_json_array(path):
        return ((f"{path} item {n}", record) for n, record in read_json(path, rejects=rejects))
    return ((f"{path}:{n}", record) for n, record in read_jsonl(path, rejects=rejects, can_skip=True))


@dataclass(frozen=True)
class HubDataset:
    """A dataset on the Hugging Face hub, as `data.path` names it."""
    path: str
    """The data.path text, e.g. `hf://datasets/mbien/recipe_nlg?split=train`."""
    name: str
    """OWNER/NAME, what `datasets.load_dataset` takes."""
    config: str | None
    split: str
    revision: str | None = None
    """A branch, tag or commit; None: the latest."""

    @property
    def rejects_name(self) -> str:
        """A local file name for this dataset's rejected rows (data.on_error=skip)."""
        return f"{self.name.replace('/', '--')}.rejects.jsonl"


def parse_hub_path(path: str | Path) -> HubDataset | None:
    """The hub dataset `path` names (`hf://datasets/OWNER/NAME[?config=C&split=S&revision=R]`), or None for a local
    path. A malformed hub name raises DataError."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return None
    usage = (f"a hub dataset is written {HUB_PREFIX}OWNER/NAME, optionally followed by "
             "?config=CONFIG&split=SPLIT&revision=REV "
             f"(e.g. {HUB_PREFIX}mbien/recipe_nlg?split=train)")
    name, _, query = text[len(HUB_PREFIX):].partition("?")
    parts = name.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise DataError(f"data.path={text!r}: {usage}")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if key not in HUB_OPTIONS or not equals or not value or key in options:
            raise DataError(f"data.path={text!r}: bad option {item!r} (options: {', '.join(HUB_OPTIONS)}, each once "
                            f"with a value); {usage}")
        options[key] = value
    return HubDataset(path=text, name="/".join(parts), config=options.get("config"),
                      split=options.get("split", "train"), revision=options.get("revision"))


def read_hub_dataset(hub: HubDataset) -> Iterator[tuple[str, dict]]:
    """Load `hub` with `datasets.load_dataset` now (errors surface here, not at the first record) and stream its
    rows."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path={hub.path!r} names a Hugging Face hub dataset, which needs the optional "
                        "`datasets` package: pip install 'datasets>=2.19' (or set data.path to a local copy of "
                        "the data)") from None
    try:
        dataset = datasets.load_dataset(hub.name, hub.config, split=hub.split, revision=hub.revision)
    except (ConnectionError, OSError, ValueError) as err:  # offline, unknown dataset, config or split
        raise DataError(f"data.path={hub.path!r}: could not load hub dataset {hub.name!r} (config={hub.config}, "
                        f"split={hub.split}): {type(err).__name__}: {err}. Check the name, config and split; "
                        "without network access, save a copy where there is network (datasets.load_dataset(...)"
                        ".save_to_disk(DIR) or .to_json(FILE.jsonl)) and set data.path to that directory or file, "
                        "or set HF_DATASETS_OFFLINE=1 to use a copy already in the Hugging Face cache") from None
    return ((f"{hub.path} row {number}", record) for number, record in enumerate(dataset, 1))


def decode_json_columns(numbered, columns, rejects: Rejects | None = None) -> Iterator[tuple[str, dict]]:
    """Decode the `columns` of each record that hold JSON text (data.json_columns); a bad value is a bad row."""
    for where, record in numbered:
        try:
            for column in columns:
                if isinstance(record.get(column), str):
                    record[column] = json.loads(record[column])
        except json.JSONDecodeError as err:
            message = (f"{where}: column {column!r} is not valid JSON ({err.msg}, column {err.colno}); fix the value "
                       "or remove the column from data.json_columns")
            if rejects is None:
                raise DataError(message) from None
            rejects.add(where, message, record)
            continue
        yield where, record


def read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    yield from _numbered_batches(path, parquet.iter_batches(batch_size=BATCH_ROWS))


def read_csv(path: Path, rejects: Rejects | None, *, delimiter: str = ",") -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    bad: list[tuple[str, str]] = []
    skip = "" if rejects is not None else " or set data.on_error=skip"

    def on_invalid(row) -> str:
        line = f"{path} line {row.number}" if row.number is not None else str(path)
        bad.append((line, f"{line}: {row.actual_columns} fields, the header has {row.expected_columns}; fix the "
                          f"row (quote fields holding '{delimiter}'){skip}"))
        if rejects is not None:
            rejects.add(line, bad[-1][1], row.text)
        return "skip"

    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
                               parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
                               convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        number = 0
        for batch in reader:
            if bad and rejects is None:
                raise DataError(bad[0][1])
            for record in batch.to_pylist():
                number += 1
                yield f"{path} row {number}", record
        if bad and rejects is None:
            raise DataError(bad[0][1])
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not readable as CSV ({err})") from None


def read_saved_dataset(path: Path) -> Iterator[tuple[str, dict]]:
    """A `datasets.Dataset.save_to_disk` directory: Arrow IPC stream files listed in state.json."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{path}/state.json lists no data files; re-save the dataset with save_to_disk")
    number = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                for record in batch.to_pylist():
                    number += 1
                    yield f"{path} row {number}", record


def is_text_source(path: str | Path) -> bool:
    """Whether `iter_records` reads `path` as plain-text documents (a text folder or a `.txt` / `.md` file)."""
    if parse_hub_path(path) is not None:
        return False
    path = Path(path)
    if path.is_dir():
        return not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file()
    return path.is_file() and path.suffix.lower() in TEXT_SUFFIXES


def read_text_folder(path: Path, rejects: Rejects | None) -> Iterator[tuple[str, dict]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                          for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} holds no files: a text folder needs one document per file")
    for file in files:
        if (text := read_document(file, rejects)) is not None:
            yield str(file), {"text": text, "file": str(file.relative_to(path))}


def read_text_file(path: Path, rejects: Rejects | None) -> Iterator[tuple[str, dict]]:
    """A `.txt` / `.md` file: one document, as one file of a text folder is."""
    if (text := read_document(path, rejects)) is not None:
        yield str(path), {"text": text, "file": path.name}


def read_document(file: Path, rejects: Rejects | None) -> str | None:
    """The UTF-8 text of `file`; a file that is not UTF-8 raises, or with `rejects` is recorded there (None)."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        message = f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); re-encode it or remove it"
        if rejects is None:
            raise DataError(message) from None
        rejects.add(str(file), message)
        return None


def _numbered_batches(path: Path, batches) -> Iterator[tuple[str, dict]]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield f"{path} row {number}", record
