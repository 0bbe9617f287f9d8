"""CLI commands a user runs, through `optrush.cli.main.main` (the console script's entry point)."""
import json
import re

from optrush.cli.main import main


def test_tokenizer_train_from_jsonl_and_txt(tmp_path, recipe_corpus):
    from optrush.data.tokenizer import load_tokenizer

    path, records = recipe_corpus
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(path), "--column", "title", "--vocab-size", "300",
                 "--out", str(out)]) == 0
    tokenizer = load_tokenizer(out)
    title = records[0]["title"]
    assert tokenizer.decode(tokenizer.encode(title, add_special_tokens=False)) == title
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(r["title"] for r in records))
    assert main(["tokenizer", "train", "--corpus", str(txt), "--vocab-size", "300", "--out", str(tmp_path / "t2")]) == 0


def test_tokenizer_train_names_missing_column(tmp_path, recipe_corpus, capsys):
    assert main(["tokenizer", "train", "--corpus", str(recipe_corpus[0]), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 2
    assert re.search(r"data error: .*recipes.jsonl:1: no column 'text'", capsys.readouterr().err)


def test_train_from_overrides_only(debug_overrides, tmp_path):
    assert main(["train", *debug_overrides, "train.max_steps=2", "checkpoint.save_final=false"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2


def test_overrides_may_follow_flags():
    from optrush.cli.main import parse_args

    args = parse_args(["bench", "model.preset=debug", "--synthetic", "--steps", "2", "output_dir=/tmp/x"])
    assert args.steps == 2 and args.overrides == ["output_dir=/tmp/x"] and args.config == "model.preset=debug"
    args = parse_args(["check", "cfg.yaml", "--only", "packing", "data.max_length=64", "--steps", "3", "a.b=1"])
    assert args.only == ["packing"] and args.overrides == ["data.max_length=64", "a.b=1"]


def test_unknown_flag_and_stray_word_are_rejected(capsys):
    import pytest

    from optrush.cli.main import parse_args

    for argv in (["bench", "cfg.yaml", "--no-such-flag"], ["score", "ckpt", "--data", "f.jsonl", "stray"],
                 ["generate", "ckpt", "--prompt", "hi", "train.lr=1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPTRUSH_TRACEBACK", raising=False)
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err and "OPTRUSH_TRACEBACK=1" in err


def _subcommand(root, words):
    import argparse

    for word in words:
        actions = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            return root
        root = actions[0].choices[word]
    return root


def test_help_equals_the_readme_and_every_flag_it_names_exists():
    from pathlib import Path

    import optrush.cli.main as cli

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Command line\n\n```\n", 1)[1].split("```", 1)[0]
    assert block in cli.__doc__, "the CLI's --help text and README's command list differ"
    usages = re.split(r"\n(?=optrush )", block.strip())
    for usage in usages:
        syntax = "\n".join(line for line in usage.splitlines() if not line.startswith(" " * 40)) + " "
        words = re.match(r"optrush ([a-z ]+?)(?= [A-Z\[-]|\|)", usage.split("\n")[0] + " ").group(1).split()
        sub = _subcommand(cli.parser(), words[:2])
        known = {s for a in sub._actions for s in a.option_strings}
        flags = set(re.findall(r"(--[a-z][a-z-]*)", syntax))
        assert flags <= known, f"optrush {' '.join(words)}: {sorted(flags - known)} not accepted"
