"""Input errors from a user walkthrough: duplicate YAML keys, messages that name the config key, bad data lines
reported in file order, and empty or too small data refused with what to do."""
import json
import re

import pytest

from optrush.config import ConfigError, load_config
from optrush.config.schema import DataCleanConfig, DataConfig
from optrush.data.dataset import build_datasets
from optrush.data.reader import DataError

BASE = ["model.preset=debug", "data.tokenizer=tok"]


@pytest.mark.parametrize("text, expected", [
    ("train:\n  lr: 1e-3\nmodel:\n  preset: debug\ntrain:\n  max_steps: 2\n",
     r"run\.yaml:5: duplicate key 'train' \(first set at line 1\)"),
    ("train:\n  lr: 1e-3\n  max_steps: 2\n  lr: 2e-3\n",
     r"run\.yaml:4: duplicate key 'train\.lr' \(first set at line 2\)"),
    ("model:\n  rope_scaling:\n    factor: 4.0\n    factor: 8.0\n",
     r"run\.yaml:4: duplicate key 'model\.rope_scaling\.factor' \(first set at line 3\)"),
])
def test_duplicate_yaml_keys_name_the_file_line_and_key(text, expected, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, BASE)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from optrush.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("key", ["path", "eval_path"])
def test_missing_data_file_names_the_key_and_the_working_directory(key, recipe_corpus, tok, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = {"path": str(recipe_corpus[0]), key: "nothere.jsonl"}
    with pytest.raises(DataError, match=rf"data\.{key}=nothere\.jsonl: no such file or directory \(a relative path "
                                        rf"is taken from the working directory, {re.escape(str(tmp_path))}\)"):
        build_datasets(DataConfig(format="recipe", **paths), tok, seed=0)


def test_tokenizer_errors_name_the_key_and_tell_a_file_from_a_missing_path(tokenizer_dir, tmp_path):
    from optrush.data.tokenizer import load_config_tokenizer

    def config(**data):
        return load_config(None, ["model.preset=debug", *(f"data.{k}={v}" for k, v in data.items())])

    with pytest.raises(DataError, match=r"data\.tokenizer=.*nowhere: no such directory"):
        load_config_tokenizer(config(tokenizer=tmp_path / "nowhere"))
    (tmp_path / "notok").write_text("")
    with pytest.raises(DataError, match=r"data\.tokenizer=.*notok is a file, not a directory"):
        load_config_tokenizer(config(tokenizer=tmp_path / "notok"))
    with pytest.raises(DataError, match=rf"tokenizer\.json is a file, not a directory: give the directory that holds "
                                        rf"it, {re.escape(str(tokenizer_dir))}"):
        load_config_tokenizer(config(tokenizer=tokenizer_dir / "tokenizer.json"))
    cfg = load_config(None, [f"model.path={tmp_path / 'model'}"], complete=False)
    with pytest.raises(DataError, match=r"model\.path=.*model: no such directory"):
        load_config_tokenizer(cfg)


def test_data_cli_names_the_tokenizer_key(recipe_corpus, tmp_path, capsys):
    from optrush.cli.main import main

    (tmp_path / "notok").write_text("")
    assert main(["data", "stats", "model.preset=debug", f"data.path={recipe_corpus[0]}",
                 f"data.tokenizer={tmp_path / 'notok'}"]) == 2
    assert "data.tokenizer=" in capsys.readouterr().err


def test_no_examples_error_says_what_the_caller_reads_the_data_for(tmp_path, tok):
    from optrush.data.preference import build_preference_datasets

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"no evaluation examples left from .*empty\.jsonl: read 0 records; the file "
                                        "holds no records"):
        build_datasets(DataConfig(path=str(empty)), tok, seed=0, purpose="evaluation")
    with pytest.raises(DataError, match=r"no evaluation pairs left from .*empty\.jsonl"):
        build_preference_datasets(DataConfig(path=str(empty), format="preference"), tok, seed=0,
                                  purpose="evaluation")


def bad_lines_file(tmp_path, records):
    """The records as JSONL with a missing column at line 11, a JSON array at line 13 and another gap at 17."""
    rows = [dict(record) for record in records[:20]]
    del rows[10]["directions"]
    rows[12] = "[1, 2]"
    del rows[16]["title"]
    return write_rows(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize("settings", [{}, {"num_proc": 2}, {"clean": DataCleanConfig(dedup=True)}],
                         ids=["one process", "two processes", "a fitted cleaning rule"])
def test_the_first_bad_line_in_file_order_is_reported_with_the_count_of_the_others(settings, recipe_corpus, tok,
                                                                                 tmp_path):
    path = bad_lines_file(tmp_path, recipe_corpus[1])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(path=str(path), format="recipe", **settings), tok, seed=0)
    message = str(err.value)
    assert message.startswith(f"{path}:11: missing column 'directions'")
    assert f"2 other rows of {path} cannot be read or rendered either ({path}:13, {path}:17)" in message


def test_preference_data_reports_the_first_bad_line_in_file_order(short_pairs_file, tok, tmp_path):
    from optrush.data.preference import build_preference_datasets

    rows = [json.loads(line) for line in short_pairs_file.read_text().splitlines()[:8]]
    del rows[2]["chosen"]
    rows[4] = "not json"
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_preference_datasets(DataConfig(path=str(path), format="preference"), tok, seed=0)
    assert str(err.value).startswith(f"{path}:3: a preference record needs")
    assert f"1 other row of {path} cannot be read or rendered either ({path}:5)" in str(err.value)


def test_cleaning_an_empty_file_says_it_holds_no_records(tmp_path, tok):
    from optrush.data.clean_report import clean_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = DataConfig(path=str(empty), format="recipe", clean=DataCleanConfig(dedup=True))
    with pytest.raises(DataError, match=r"empty\.jsonl holds no records: nothing to clean"):
        clean_dataset(cfg, tokenizer=tok, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "token_lengths.png").exists()  # no histogram of nothing (and no log-scale warning)
    assert not list((tmp_path / "out").glob("empty.clean.jsonl*"))  # no cleaned file that looks complete
    with pytest.raises(DataError, match=r"no training examples left .*the file holds no records") as err:
        build_datasets(cfg, tok, seed=0)
    assert "dropped every record" not in str(err.value)


@pytest.mark.parametrize("arguments, expected", [
    ({"records": 5}, r"--records 5: the demo needs at least 20"),
    ({"records": 0}, r"--records 0: the demo needs at least 20"),
    ({"steps": 0}, r"--steps 0: give at least 1 optimizer step"),
])
def test_demo_refuses_unusable_arguments_before_any_work(arguments, expected, tmp_path, monkeypatch):
    import optrush.cli.demo as demo

    monkeypatch.setattr(demo, "generate_recipes", lambda *a, **k: pytest.fail("generated data before checking"))
    with pytest.raises(ConfigError, match=expected):
        demo.run_demo(out_dir=tmp_path / "demo", **arguments)
    assert not (tmp_path / "demo").exists()


def test_tokenizer_training_refuses_an_empty_corpus(tmp_path, capsys):
    from optrush.cli.main import main
    from optrush.data.tokenizer import train_tokenizer

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", '{"text": "  "}\n'), ("empty.txt", "\n")):
        (tmp_path / name).write_text(text)
        assert main(["tokenizer", "train", "--corpus", str(tmp_path / name), "--vocab-size", "300",
                     "--out", str(tmp_path / "tok")]) == 2
        assert f"{name} holds no" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
    with pytest.raises(DataError, match="no text to train a tokenizer on: 2 texts given"):
        train_tokenizer(["", " "], vocab_size=300, out_dir=tmp_path / "tok")
