"""Tokenize once: the examples of a data source cached on disk, and tokenization spread over processes.

    examples, meta = load(cache_dir, key)                     # None on a miss; examples memory-mapped
    save(cache_dir, key, examples, meta)
    key = cache_key(path, cfg=cfg.data, tokenizer=tok)

An entry is a directory `<cache_dir>/<key>/` holding `tokens.npy` and `labels.npy` (int32, every example's
input ids / labels back to back), `offsets.npy` (int64, n + 1 example boundaries) and `meta.json` (the counts of
the data report): the three arrays of `optrush.data.examples.Examples`, written as they are and memory-mapped on
load, so a hit costs no parsing and the examples live in the page cache. The key hashes:

- the data: path, size and modification time of the file (of every file, for a directory); for a hub dataset
  (`hf://datasets/...`), its name, config, split and revision (without `?revision=`, a new version on the hub
  is not noticed: clear the cache entry);
- the tokenizer: the contents of its tokenizer files, and its BOS/EOS/PAD ids;
- the config fields that change the examples (format, columns, chat template, max_length, too_long, clean rules,
  on_error); fields that only order or batch examples (packing, shuffle, eval split, num_proc) are left out;
- `VERSION`, bumped whenever the encoding changes.

Entries are written to a temporary directory and renamed into place, so a crash never leaves half an entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from optrush.config.schema import DataConfig
from optrush.data.examples import Examples
from optrush.data.sources import parse_hub_path

VERSION = 2  # 2: the counts of tokens cut by truncation and of split documents
IGNORED_FIELDS = ("path", "eval_path", "eval_fraction", "packing", "shuffle", "num_proc", "cache_dir",
                  "rejects_path")


def cache_key(path: str | Path, *, cfg: DataConfig, tokenizer) -> str:
    if parse_hub_path(path) is not None:  # name, config, split, revision: pin ?revision= or a hub update goes unseen
        data = [str(path)]
    else:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        data = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in IGNORED_FIELDS}
    tok = hashlib.sha256()
    tok_dir = Path(tokenizer.name_or_path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            tok.update(name.encode() + (tok_dir / name).read_bytes())
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer))
    blob = json.dumps({"version": VERSION, "data": data, "config": config, "tokenizer": tok.hexdigest(),
                       "ids": ids}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save(cache_dir: str | Path, key: str, examples: Examples, meta: dict) -> Path:
    final = Path(cache_dir) / key
    tmp = Path(cache_dir) / f".{key}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", examples.tokens)
    np.save(tmp / "labels.npy", examples.labels)
    np.save(tmp / "offsets.npy", examples.offsets)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():  # another process wrote the same entry first: same key, same contents
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


def load(cache_dir: str | Path, key: str) -> tuple[Examples, dict] | None:
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").is_file():
        return None
    examples = Examples(np.load(entry / "tokens.npy", mmap_mode="r"), np.load(entry / "labels.npy", mmap_mode="r"),
                        np.load(entry / "offsets.npy"))
    return examples, json.loads((entry / "meta.json").read_text())
