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
