"""Cleaning from config (data.clean.*): each rule drops what it should and counts it, near-duplicates are found,
training applies the rules, an emptied dataset is an error with the per-rule counts, and `optrush data clean`
writes the cleaned data and a report."""
import json

import pytest

from optrush.config.schema import DataCleanConfig, DataConfig
from optrush.data.clean import clean_records, rules_from_config
from optrush.data.dataset import build_datasets
from optrush.data.neardup import NearDuplicates
from optrush.data.reader import DataError
from optrush.data.sources import iter_records
from optrush.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def recipe(title, ingredients, steps=("Mix everything well.",), ner=None):
    return {"title": title, "ingredients": list(ingredients), "directions": list(steps),
            "NER": list(ner if ner is not None else ingredients)}


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_rule_counts_what_it_drops(tok):
    records = [recipe("Soup", ["salt", "water"]),
               recipe("Soup", ["salt", "water"]),                       # exact duplicate
               recipe("Stew", ["salt"]),                                 # too few items
               recipe("Cake", ["salt", "water", "murbla"]),             # murbla: rare
               recipe("Caf\u00e9 Soup", ["salt", "water"]),             # outside ascii
               recipe("Spam SPAM", ["salt", "water"]),                  # pattern
               recipe("Long", ["salt", "water"], steps=["Stir " * 200])]  # too many tokens and characters
    clean = DataCleanConfig(drop_patterns=["SPAM"], charset=r"[\x00-\x7f]", min_items=2, max_tokens=200,
                            dedup=True, rare_field="NER", rare_min_count=2)
    cfg = DataConfig(format="recipe", clean=clean)
    kept, report = clean_records(records, rules=rules_from_config(cfg, tok))
    assert [r["title"] for r in kept] == ["Soup"]
    assert report.dropped == {"pattern": 1, "charset": 1, "items": 1, "tokens": 1, "duplicate": 1,
                              "rare_vocabulary": 1}
    assert report.total == 7 and report.kept == 1 and "murbla" in report.examples["rare_vocabulary"][0]
    assert rules_from_config(DataConfig()) == []  # everything off by default


def test_near_duplicates_are_found_and_the_first_is_kept():
    base = ("preheat the oven then mix the flour sugar butter and eggs in a large bowl until smooth and pour the "
            "batter into a greased pan and bake until golden then let it cool on a rack before you slice and serve "
            "it with cream")
    records = [{"text": base}, {"text": "a completely different text about grilling fish over charcoal fire"},
               {"text": base.replace("large", "big")}, {"text": base + " for twenty minutes"}]
    kept, report = clean_records(records, rules=[NearDuplicates(threshold=0.7, ngram=3)])
    assert kept == records[:2] and report.dropped == {"near_duplicate": 2}
    assert "similar to" in report.examples["near_duplicate"][0]


def test_training_applies_the_rules_and_an_emptied_dataset_is_an_error(tmp_path, tok):
    rows = [recipe("Soup", ["salt", "water"]), recipe("Soup", ["salt", "water"]), recipe("Stew", ["salt", "oil"])]
    path = write(tmp_path / "r.jsonl", rows)
    cfg = DataConfig(path=str(path), format="recipe", clean=DataCleanConfig(dedup=True))
    train, _, report = build_datasets(cfg, tok, seed=0)
    assert len(train) == 2 and report.clean.dropped == {"duplicate": 1}
    assert "duplicate" in report.format() and report.as_dict()["clean"]["kept"] == 2
    cfg = DataConfig(path=str(path), format="recipe", clean=DataCleanConfig(dedup=True, min_items=3))
    with pytest.raises(DataError, match=r"dropped every record(.|\n)*items +3"):
        build_datasets(cfg, tok, seed=0)


def test_data_clean_command_writes_data_and_report(recipe_corpus, tokenizer_dir, tmp_path, capsys):
    from optrush.cli.main import main

    path, records = recipe_corpus
    out = tmp_path / "clean"
    overrides = [f"data.path={path}", f"data.tokenizer={tokenizer_dir}", "model.preset=debug", "data.format=recipe",
                 "data.clean.min_items=4", "data.clean.near_dedup=true"]
    assert main(["data", "clean", *overrides, "--out", str(out)]) == 0
    summary = json.loads((out / "report.json").read_text())
    kept = [json.loads(line) for line in (out / "recipes.clean.jsonl").read_text().splitlines()]
    assert summary["total"] == len(records) and summary["kept"] == len(kept) < len(records)
    assert summary["dropped"]["items"] > 0 and all(len(r["ingredients"]) >= 4 for r in kept)
    assert summary["tokens_before"]["count"] == len(records) and summary["tokens_after"]["count"] == len(kept)
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| `items` |" in md and "token_lengths.png" in md
    capsys.readouterr()
    assert main(["data", "clean", *overrides, "data.clean.min_items=99", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "data error: data.clean dropped every record" in err and "items" in err
    assert (tmp_path / "none" / "report.md").exists() and not list((tmp_path / "none").glob("recipes.clean.jsonl*"))


def test_training_streams_cleaning_in_one_pass_per_fitted_rule(tmp_path, tok, monkeypatch):
    """dedup, near_dedup and rare vocabulary each re-read the file once (no record list held), later rules see only
    what earlier ones kept (zork is in two records, one a duplicate: once deduplicated, it is rare), bad rows are
    rejected once, and the examples equal those of the in-memory cleaner's survivors."""
    import optrush.data.dataset as dataset

    rows = [recipe("Soup", ["salt", "zork"]), recipe("Soup", ["salt", "zork"]), recipe("Stew", ["salt", "oil"]),
            recipe("Pie", ["salt", "oil"], steps=["Bake it."]), recipe("Tea", ["oil", "water"]),
            recipe("Jam", ["water", "salt"])]
    path = write(tmp_path / "r.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    opened = []
    monkeypatch.setattr(dataset, "iter_records",
                        lambda p, rejects=None, key=None: opened.append(p) or iter_records(p, rejects=rejects, key=key))
    clean = DataCleanConfig(dedup=True, near_dedup=True, rare_field="NER", rare_min_count=2)
    cfg = DataConfig(path=str(path), format="recipe", clean=clean, on_error="skip")
    train, _, report = build_datasets(cfg, tok, seed=0)
    assert len(opened) == 4 and report.train.rejected == 1
    assert report.clean.dropped == {"duplicate": 1, "near_duplicate": 0, "rare_vocabulary": 1}
    kept, expected = clean_records(rows, rules=rules_from_config(cfg))
    assert [r["title"] for r in kept] == ["Stew", "Pie", "Tea", "Jam"] and report.clean == expected
    plain, _, _ = build_datasets(DataConfig(path=str(write(tmp_path / "k.jsonl", kept)), format="recipe"), tok, seed=0)
    assert train == plain


def test_data_clean_honours_on_error_skip_and_counts_the_rejects(tmp_path, tok):
    from optrush.data.clean_report import clean_dataset

    csv = tmp_path / "bad.csv"
    csv.write_text('prompt,completion\nquestion: soup, yes good answer\nquestion: pasta, yes,extra field\n'
                   '"question: unterminated, oops\nquestion: salt, yes good answer salt\n')
    jsonl = write(tmp_path / "bad.jsonl", [{"prompt": "question: soup", "completion": " yes"}])
    with open(jsonl, "a") as f:
        f.write("{not json\n" + json.dumps({"prompt": "question: salt", "completion": " yes"}) + "\n")
    for path, bad, kept in ((csv, 2, 1), (jsonl, 1, 2)):
        cfg = DataConfig(path=str(path), format="prompt_completion", clean=DataCleanConfig(dedup=True))
        with pytest.raises(DataError, match=rf"{path.name}.* line 3|{path.name}:2"):
            clean_dataset(cfg, tokenizer=tok, out_dir=tmp_path / "error")
        assert not list((tmp_path / "error").glob("bad.clean.jsonl*"))  # not the rows before the bad one
        cfg.on_error = "skip"
        out = tmp_path / f"clean_{path.suffix[1:]}"
        paths = clean_dataset(cfg, tokenizer=tok, out_dir=out)
        summary = json.loads(paths["json"].read_text())
        assert summary["rejected"] == bad and summary["kept"] == kept, summary
        assert paths["rejects"] == out / "bad.rejects.jsonl" and len(paths["rejects"].read_text().splitlines()) == bad
        assert len(paths["data"].read_text().splitlines()) == kept
        assert f"Skipped **{bad}** bad rows" in paths["markdown"].read_text()


def test_null_in_a_nonempty_column_is_dropped_and_elsewhere_an_error_naming_file_and_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from optrush.data.clean_report import clean_dataset

    rows = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(5)]
    rows[3]["prompt"] = None
    path = tmp_path / "pc.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)

    def config(**kw):
        return DataConfig(path=str(path), format="prompt_completion", **kw)

    paths = clean_dataset(config(clean=DataCleanConfig(nonempty=["prompt", "completion"])), tokenizer=tok,
                          out_dir=tmp_path / "nonempty")
    summary = json.loads(paths["json"].read_text())
    assert summary["dropped"] == {"empty": 1} and summary["kept"] == 4 and "'prompt' is null" in summary["examples"][
        "empty"][0]
    with pytest.raises(DataError, match=rf"{path} row 4: column 'prompt' is null; .*data.clean.nonempty: \[prompt\]"):
        clean_dataset(config(), tokenizer=tok, out_dir=tmp_path / "error")
    summary = json.loads(clean_dataset(config(on_error="skip"), tokenizer=tok, out_dir=tmp_path / "skip")["json"]
                         .read_text())
    assert summary["rejected"] == summary["unrenderable"] == 1 and summary["kept"] == 4
    # training with a token-count rule: its fit pass leaves the row to encoding, which rejects it with its place
    train, _, report = build_datasets(config(on_error="skip", rejects_path=str(tmp_path / "r.jsonl"),
                                             clean=DataCleanConfig(max_tokens=100)), tok, seed=0)
    assert len(train) == 4 and report.train.rejected == 1 and f"{path} row 4" in report.train.reject_messages[0]


def test_text_rules_read_the_messages_of_chat_records():
    def chat(user, assistant):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    records = [chat("how do I boil an egg?", "Put it in boiling water for nine minutes."), chat("hi", "ok"),
               chat("buy cheap pills now", "Visit the link for a discount on everything today.")]
    cfg = DataConfig(format="chat", clean=DataCleanConfig(min_chars=20, drop_patterns=["cheap pills"]))
    kept, report = clean_records(records, rules=rules_from_config(cfg))
    assert kept == records[:1]  # the short chat by its length, the spam by its user turn; roles are not text
    assert report.kept == 1
