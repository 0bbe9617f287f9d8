"""Tokenize once: the second build hits the cache and gives identical examples and counts; changing the data, the
config or the tokenizer misses; multiprocess tokenization gives the same examples as one process."""
import dataclasses
import json
import os

import pytest

from optrush.config.schema import DataCleanConfig, DataConfig
from optrush.data import cache
from optrush.data.dataset import build_datasets
from optrush.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_second_build_hits_the_cache_with_identical_examples(recipe_corpus, tok, tmp_path, monkeypatch):
    path, records = recipe_corpus
    cfg = DataConfig(path=str(path), format="recipe", max_length=128, cache_dir=str(tmp_path / "cache"),
                     clean=DataCleanConfig(min_items=3))
    first, _, report1 = build_datasets(cfg, tok, seed=0)
    assert report1.train.cache == "written" and len(list((tmp_path / "cache").iterdir())) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr("optrush.data.dataset.encode_records", no_encoding)
    second, _, report2 = build_datasets(cfg, tok, seed=0)
    assert report2.train.cache == "hit" and second == first
    assert report2.as_dict()["train"]["dropped"] == report1.as_dict()["train"]["dropped"]
    assert report2.train.truncated == report1.train.truncated > 0
    assert report2.clean.as_dict() == report1.clean.as_dict() and "loaded from the cache" in report2.format()


def test_key_changes_with_data_config_and_tokenizer(recipe_corpus, tok, tmp_path):
    path, _ = recipe_corpus
    cfg = DataConfig(path=str(path), format="recipe")
    key = cache.cache_key(path, cfg=cfg, tokenizer=tok)
    assert key == cache.cache_key(path, cfg=dataclasses.replace(cfg, packing="none", num_proc=2), tokenizer=tok)
    assert key != cache.cache_key(path, cfg=dataclasses.replace(cfg, max_length=99), tokenizer=tok)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert key != cache.cache_key(copy, cfg=cfg, tokenizer=tok)
    before = cache.cache_key(copy, cfg=cfg, tokenizer=tok)
    os.utime(copy, ns=(1, 1))
    assert before != cache.cache_key(copy, cfg=cfg, tokenizer=tok)


def test_multiprocess_tokenization_equals_one_process(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("optrush.data.dataset.CHUNK_RECORDS", 32)  # several chunks per worker
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Recipe: Soup {i}\n", "completion": "Stir. " * (i % 7)} for i in range(300)]
    rows[17] = {"prompt": "no completion"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(path=str(path), format="prompt_completion", on_error="skip", max_length=12)
    one, _, r1 = build_datasets(DataConfig(**kw), tok, seed=0)
    many, _, r2 = build_datasets(DataConfig(**kw, num_proc=2), tok, seed=0)
    assert many == one and r2.as_dict()["train"] == r1.as_dict()["train"] and r2.train.rejected == 1
