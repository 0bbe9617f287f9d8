"""Files -> examples: batched tokenization equals per-record encoding, too_long policies are counted, the eval
split is deterministic, and errors name the file and line."""
import json

import pytest

from optrush.config.schema import DataConfig
from optrush.data.dataset import build_datasets
from optrush.data.formats import encode_record
from optrush.data.reader import DataError
from optrush.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_examples_equal_per_record_encoding(recipe_corpus, tok):
    path, records = recipe_corpus
    cfg = DataConfig(path=str(path), format="recipe", max_length=100_000)
    train, evals, report = build_datasets(cfg, tok, seed=0)
    assert evals == [] and report.train.records == len(records) == len(train)
    for i in (0, 1, len(records) - 1):
        assert train[i] == encode_record(records[i], cfg=cfg, tokenizer=tok, where=f"{path}:{i + 1}")
    assert report.tokens == sum(map(len, train)) and report.trained_tokens == sum(e.num_trained for e in train)
    assert f"{len(records)} records from {path}" in report.format()


def test_too_long_policies_are_counted(tmp_path, tok):
    rows = [{"prompt": "Recipe: Soup\n", "completion": "Stir. " * n} for n in (1, 2, 40, 3, 60)]
    rows.append({"prompt": "Recipe: " + "very long title " * 30, "completion": "Stir."})  # prompt alone too long
    path = write(tmp_path / "pc.jsonl", rows)
    base = dict(path=str(path), format="prompt_completion", max_length=32)

    train, _, report = build_datasets(DataConfig(**base, too_long="truncate"), tok, seed=0)
    assert len(train) == 5 and report.train.truncated == 2
    assert dict(report.train.dropped) == {"no_trained_tokens": 1}
    assert max(map(len, train)) == 32 and all(e.num_trained > 0 for e in train)

    train, _, report = build_datasets(DataConfig(**base, too_long="drop"), tok, seed=0)
    assert len(train) == 3 and dict(report.train.dropped) == {"too_long": 3} and report.train.truncated == 0
    assert "dropped too_long 3" in report.format()

    with pytest.raises(DataError, match=r"pc.jsonl:3: \d+ tokens > data.max_length=32; raise data.max_length"):
        build_datasets(DataConfig(**base, too_long="error"), tok, seed=0)


def test_eval_split_is_deterministic_and_disjoint(tmp_path, tok):
    path = write(tmp_path / "t.jsonl", [{"text": f"recipe number {i}"} for i in range(50)])
    cfg = DataConfig(path=str(path), eval_fraction=0.2)
    train, evals, report = build_datasets(cfg, tok, seed=1)
    assert (len(train), len(evals)) == (40, 10) and report.eval_examples == 10
    again_train, again_evals, _ = build_datasets(cfg, tok, seed=1)
    assert again_train == train and again_evals == evals
    _, other_evals, _ = build_datasets(cfg, tok, seed=2)
    assert other_evals != evals
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in evals}

    eval_path = write(tmp_path / "e.jsonl", [{"text": "held out"}])
    train, evals, report = build_datasets(DataConfig(path=str(path), eval_path=str(eval_path)), tok, seed=0)
    assert len(train) == 50 and len(evals) == 1 and report.eval.records == 1


def test_errors_name_the_file_and_line(tmp_path, tok):
    path = write(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError, match=r"qa.jsonl:2: missing column 'completion' \(columns found: 'prompt', "
                                        r"'answer'\)"):
        build_datasets(DataConfig(path=str(path), format="prompt_completion"), tok, seed=0)
    array = tmp_path / "qa.json"
    array.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c"}]))
    with pytest.raises(DataError, match=r"qa.json item 2: missing column 'completion'"):
        build_datasets(DataConfig(path=str(array), format="prompt_completion"), tok, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"no training examples left from .*empty.jsonl: read 0 records"):
        build_datasets(DataConfig(path=str(empty)), tok, seed=0)
    with pytest.raises(DataError, match="data.path is not set"):
        build_datasets(DataConfig(), tok, seed=0)


@pytest.mark.parametrize("eval_fraction", [0.0, 0.02])
def test_max_length_too_small_reports_the_drops_not_the_eval_split(tmp_path, tok, eval_fraction):
    rows = [{"prompt": "Recipe: Soup with a long title\n", "completion": "Stir."}] * 10
    path = write(tmp_path / "pc.jsonl", rows)
    cfg = DataConfig(path=str(path), format="prompt_completion", max_length=5, eval_fraction=eval_fraction)
    with pytest.raises(DataError, match=r"pc.jsonl: read 10 records; 10 dropped as no_trained_tokens: the prompt "
                                        r"alone reaches data.max_length=5.*raise data.max_length") as err:
        build_datasets(cfg, tok, seed=0)
    assert "eval_fraction" not in str(err.value)
    cfg = DataConfig(path=str(path), format="prompt_completion", max_length=5, too_long="drop", eval_fraction=0.5)
    with pytest.raises(DataError, match=r"10 dropped as too_long: longer than data.max_length=5 "
                                        r"\(data.too_long=drop\)"):
        build_datasets(cfg, tok, seed=0)


def test_preference_pairs_too_long_report_max_length_not_the_eval_split(tmp_path, tok):
    from optrush.data.preference import build_preference_datasets

    path = write(tmp_path / "pairs.jsonl", [{"prompt": "Recipe: Soup", "chosen": "Stir.", "rejected": "No."}] * 4)
    cfg = DataConfig(path=str(path), format="preference", max_length=5, eval_fraction=0.5)
    with pytest.raises(DataError, match=r"pairs.jsonl: read 4 records; all 4 pairs are longer than "
                                        r"data.max_length=5 .*raise data.max_length"):
        build_preference_datasets(cfg, tok, seed=0)
