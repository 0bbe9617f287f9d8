"""Pretraining-style text: a .txt/.md file is one document (as one file of a text folder), other formats refuse it;
data.too_long=split cuts long documents into pieces that give back every token once, counted in the data report,
through multiprocess tokenization, the cache and packing; split is refused for formats with prompts."""
import dataclasses

import numpy as np
import pytest

from optrush.config import ConfigError, load_config
from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.dataset import build_datasets
from optrush.data.reader import DataError
from optrush.data.recipes import recipe_completion, recipe_prompt
from optrush.data.sources import iter_records
from optrush.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def long_text(recipe_corpus):
    """A document of a few hundred tokens, written as the tokenizer knows it (recipes)."""
    return "\n\n".join(recipe_prompt(r) + recipe_completion(r) for r in recipe_corpus[1][:6])


def document_tokens(text, tok):
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("name", ["corpus.txt", "notes.md"])
def test_text_file_is_one_document_like_a_text_folder(tmp_path, tok, long_text, name):
    file = tmp_path / name
    file.write_text(long_text)
    assert list(iter_records(file)) == [(str(file), {"text": long_text, "file": name})]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / name).write_text(long_text)
    cfg = DataConfig(path=str(file), max_length=100_000)
    from_file, _, report = build_datasets(cfg, tok, seed=0)
    from_folder, _, _ = build_datasets(dataclasses.replace(cfg, path=str(folder)), tok, seed=0)
    assert len(from_file) == 1 and from_file == from_folder and report.train.records == 1


@pytest.mark.parametrize("data_format", ["prompt_completion", "recipe"])
def test_text_file_with_a_record_format_names_data_format(tmp_path, tok, data_format):
    file = tmp_path / "corpus.txt"
    file.write_text("one document")
    with pytest.raises(DataError, match=rf"corpus.txt is plain text.*data.format=text.*data.format={data_format}"):
        build_datasets(DataConfig(path=str(file), format=data_format), tok, seed=0)


def test_split_pieces_give_back_the_document_and_are_counted(tmp_path, tok, long_text):
    file = tmp_path / "corpus.txt"
    file.write_text(long_text)
    document = document_tokens(long_text, tok)
    assert len(document) - 1 > 3 * 32  # several pieces
    train, _, report = build_datasets(DataConfig(path=str(file), max_length=32, too_long="split"), tok, seed=0)
    pieces = list(train)
    assert all(1 <= len(piece) <= 32 for piece in pieces) and pieces[0].input_ids[0] == tok.bos_token_id
    inputs = np.concatenate([piece.input_array for piece in pieces]).tolist()
    assert inputs + [pieces[-1].labels[-1]] == document  # no token lost or repeated, EOS last
    assert np.concatenate([piece.label_array for piece in pieces]).tolist() == document[1:]  # every target once
    assert all(IGNORE_INDEX not in piece.labels for piece in pieces)
    assert (report.train.split, report.train.split_pieces) == (1, len(pieces) - 1)
    assert report.train.as_dict()["split_pieces"] == len(pieces) - 1 and report.tokens == len(document) - 1
    assert f"split long documents: 1, into {len(pieces)} examples" in report.format()


def test_truncation_reports_the_tokens_it_cut(tmp_path, tok, long_text):
    file = tmp_path / "corpus.txt"
    file.write_text(long_text)
    positions = len(document_tokens(long_text, tok)) - 1
    train, _, report = build_datasets(DataConfig(path=str(file), max_length=32), tok, seed=0)
    assert report.train.truncated == 1 and report.train.truncated_tokens == positions - 32
    assert f"truncated 1 kept ({positions - 32:,} tokens cut)" in report.format()


def test_split_through_worker_processes_and_the_cache(tmp_path, tok, long_text, monkeypatch):
    monkeypatch.setattr("optrush.data.dataset.CHUNK_RECORDS", 2)  # several chunks per worker
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.txt").write_text(long_text[:60 * (i + 1)])
    cfg = DataConfig(path=str(folder), max_length=24, too_long="split", cache_dir=str(tmp_path / "cache"))
    one, _, r1 = build_datasets(dataclasses.replace(cfg, cache_dir=None), tok, seed=0)
    many, _, r2 = build_datasets(dataclasses.replace(cfg, num_proc=2), tok, seed=0)
    assert r1.train.split > 1 and many == one and r2.as_dict()["train"] == r1.as_dict()["train"]
    assert r2.train.cache == "written"
    hit, _, r3 = build_datasets(cfg, tok, seed=0)
    assert r3.train.cache == "hit" and hit == one and r3.as_dict()["train"] == r1.as_dict()["train"]
    truncated, _, r4 = build_datasets(dataclasses.replace(cfg, too_long="truncate"), tok, seed=0)
    assert r4.train.cache == "written" and len(truncated) == 7  # too_long is part of the cache key


@pytest.mark.parametrize("data_format", ["prompt_completion", "recipe", "chat", "preference"])
def test_split_is_refused_for_formats_with_prompts(debug_overrides, data_format):
    with pytest.raises(ConfigError, match=rf"data.too_long=split .*data.format={data_format}"):
        load_config(None, [*debug_overrides, f"data.format={data_format}", "data.too_long=split"])


def test_train_on_a_text_file_with_split_pieces(debug_overrides, tmp_path, long_text):
    from optrush.train import train

    file = tmp_path / "corpus.txt"
    file.write_text(long_text * 2)
    cfg = load_config(None, [*debug_overrides, f"data.path={file}", "data.format=text", "objective=causal_lm",
                             "data.too_long=split", "data.max_length=64", "data.packing=bfd", "train.max_steps=2"])
    summary = train(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_check_counts_split_documents_as_reported(tmp_path, long_text, debug_overrides):
    from optrush.check.runner import run_checks

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(long_text)
    cfg = load_config(None, debug_overrides + [f"data.path={corpus}", "data.format=text", "objective=causal_lm",
                                               "data.too_long=split", "data.max_length=64", "data.eval_fraction=0"])
    report = run_checks(cfg, only=["truncation"])
    assert [(row.name, row.passed) for row in report.rows] == [("data: no sample truncated silently", True)]


def test_data_clean_names_data_format_for_a_text_file(tmp_path, long_text, tokenizer_dir, capsys):
    from optrush.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(long_text)
    assert main(["data", "clean", f"data.path={corpus}", f"data.tokenizer={tokenizer_dir}", "model.preset=debug",
                 "data.format=recipe", "--out", str(tmp_path / "out")]) == 2
    assert "is plain text, read as whole documents" in capsys.readouterr().err


def test_eval_fraction_holds_out_whole_split_documents(tmp_path, tok, long_text):
    """Pieces of one document on both sides of the split would evaluate on text the model trained on."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):  # documents of different lengths, each split into a few pieces
        (folder / f"{i:02}.txt").write_text(long_text[:80 * (i + 2)])
    cfg = DataConfig(path=str(folder), max_length=24, too_long="split", eval_fraction=0.25)
    whole, _, _ = build_datasets(dataclasses.replace(cfg, too_long="truncate", max_length=100_000, eval_fraction=0),
                                 tok, seed=0)
    documents = [e.input_ids + [e.labels[-1]] for e in whole]
    for seed in range(4):
        train, evals, report = build_datasets(cfg, tok, seed=seed)

        def rejoined(store):  # consecutive pieces back into their documents
            out, current = [], []
            for piece in store:
                current += piece.input_ids
                if piece.labels[-1] == tok.eos_token_id:
                    out.append(current + [tok.eos_token_id])
                    current = []
            assert not current  # every side ends on a whole document
            return out

        held, kept = rejoined(evals), rejoined(train)
        assert len(held) == 3 and sorted(held + kept) == sorted(documents)
        assert report.eval_examples == len(evals) > len(held)  # several pieces each


def test_document_starts_mark_only_continued_pieces(tok):
    from optrush.data.dataset import document_starts
    from optrush.data.examples import Example, Examples

    pieces = [Example([1, 5, 6], [5, 6, 7]), Example([7, 8, 9], [8, 9, 4]), Example([4], [2]),  # one document
              Example([1, 5, 6], [5, 6, 2]), Example([1, 3], [3, 2])]  # two whole documents, the first full length
    assert document_starts(Examples.from_examples(pieces), 3).tolist() == [True, False, False, True, True]
