"""Readers: Parquet, CSV, text folders and saved HF datasets give the same records as JSONL; bad rows name the
file and line/row, and data.on_error=skip counts them, reports them and writes them to a rejects file."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optrush.config.schema import DataConfig
from optrush.data.dataset import build_datasets
from optrush.data.reader import DataError
from optrush.data.sources import Rejects, iter_records
from optrush.data.tokenizer import load_tokenizer

ROWS = [{"prompt": f"Recipe: Soup {i}\n", "completion": f"Stir {i} times."} for i in range(5)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_parquet_csv_and_saved_dataset_read_like_jsonl(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(
        f"\"{r['prompt']}\",{r['completion']}\n" for r in ROWS))
    saved = tmp_path / "saved"
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink:  # the layout save_to_disk writes
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for source in (tmp_path / "d.parquet", tmp_path / "d.csv", saved):
        numbered = list(iter_records(source))
        assert [record for _, record in numbered] == ROWS, source
        assert numbered[3][0] == f"{source} row 4"


def test_text_folder_is_one_document_per_file(tmp_path, tok):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.md").write_text("second\ndocument")
    (folder / ".hidden").write_text("skipped")
    assert [r for _, r in iter_records(folder)] == [{"text": "first document", "file": "a.txt"},
                                                    {"text": "second\ndocument", "file": "sub/b.md"}]
    train, _, report = build_datasets(DataConfig(path=str(folder)), tok, seed=0)
    assert len(train) == 2 and report.train.records == 2


def test_recipenlg_style_csv_with_json_list_columns(tmp_path, tok):
    path = tmp_path / "recipes.csv"
    path.write_text('title,ingredients,directions,NER\n'
                    'Soup,"[""1 cup water"", ""salt""]","[""Boil."", ""Salt.""]","[""water"", ""salt""]"\n'
                    'Bad,"[""oops""","[]","[]"\n')
    cfg = DataConfig(path=str(path), format="recipe", json_columns=["ingredients", "directions", "NER"],
                     on_error="skip")
    (example,), _, report = build_datasets(cfg, tok, seed=0)
    assert report.train.rejected == 1 and "column 'ingredients' is not valid JSON" in report.train.reject_messages[0]
    assert "- 1 cup water" in tok.decode(example.input_ids)


def test_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("prompt,completion\na,b\nc,d,e\nf,g\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: 3 fields, the header has 2"):
        list(iter_records(tmp_path / "bad.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_records(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="data not found"):
        list(iter_records(tmp_path / "missing.parquet"))


def test_on_error_skip_counts_reports_and_writes_rejects(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps({"prompt": "no completion"}), json.dumps(ROWS[1]), "[1]"]
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(path), format="prompt_completion")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        build_datasets(cfg, tok, seed=0)
    cfg = DataConfig(path=str(path), format="prompt_completion", on_error="skip")
    train, _, report = build_datasets(cfg, tok, seed=0)
    assert len(train) == 2 and report.train.rejected == 3
    assert "skipped 3 malformed rows" in report.format() and report.as_dict()["train"]["rejected"] == 3
    rejected = sorted((json.loads(line) for line in open(f"{path}.rejects.jsonl")), key=lambda r: r["where"])
    assert [r["where"] for r in rejected] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "missing column 'completion'" in rejected[1]["error"] and rejected[0]["row"] == "{not json"
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,completion\na,b\nc,d,e\nf,g\n")
    rejects = Rejects(tmp_path / "csv_rejects.jsonl")
    assert [r["prompt"] for _, r in iter_records(csv, rejects=rejects)] == ["a", "f"] and rejects.count == 1


def test_hub_dataset_names_parse_and_bad_ones_name_the_key():
    from optrush.data.sources import parse_hub_path

    assert parse_hub_path("train.jsonl") is None
    hub = parse_hub_path("hf://datasets/mbien/recipe_nlg")
    assert (hub.name, hub.config, hub.split, hub.revision) == ("mbien/recipe_nlg", None, "train", None)
    hub = parse_hub_path("hf://datasets/o/n?config=en&split=test&revision=v1")
    assert (hub.name, hub.config, hub.split, hub.revision) == ("o/n", "en", "test", "v1")
    for bad in ("hf://datasets/just-a-name", "hf://datasets/o/n/extra", "hf://datasets/o/n?colour=red",
                "hf://datasets/o/n?split="):
        with pytest.raises(DataError, match=r"data.path=.*hf://datasets/OWNER/NAME"):
            parse_hub_path(bad)


def test_hub_dataset_errors_without_package_or_network(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"data.path='hf://datasets/o/n'.*pip install 'datasets"):
        iter_records("hf://datasets/o/n")

    def offline(name, config, *, split, revision):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"(?s)data.path='hf://datasets/o/n'.*Couldn't reach.*save_to_disk"):
        iter_records("hf://datasets/o/n")


def test_hub_dataset_rows_train_like_a_local_file(monkeypatch, tok, tmp_path):
    import sys
    import types

    calls = []

    def load_dataset(name, config, *, split, revision):
        calls.append((name, config, split, revision))
        return list(ROWS)  # a datasets.Dataset iterates as dicts, like this list

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub, local = "hf://datasets/o/soups?split=validation", tmp_path / "d.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [w for w, _ in iter_records(hub)][0] == f"{hub} row 1"
    kw = dict(format="prompt_completion", cache_dir=str(tmp_path / "cache"))
    train, _, report = build_datasets(DataConfig(path=hub, **kw), tok, seed=0)
    assert train == build_datasets(DataConfig(path=str(local), **kw), tok, seed=0)[0] and report.train.records == 5
    assert calls[0] == ("o/soups", None, "validation", None) and report.train.cache == "written"
    assert build_datasets(DataConfig(path=hub, **kw), tok, seed=0)[2].train.cache == "hit"


def test_jsonl_errors_give_the_column_within_the_line(tmp_path):
    unclosed = '{"prompt": "Recipe: Soup", "completion": "Stir it twice."'  # 57 characters, no closing brace
    (tmp_path / "open.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + unclosed + "\n")
    # the decoder places this error on the newline (it used to be reported as column 1)
    with pytest.raises(DataError, match=r"open\.jsonl:2: not valid JSON \(Expecting ',' delimiter at the end of the "
                                        r"line, column 58: is a closing brace"):
        list(iter_records(tmp_path / "open.jsonl"))
    (tmp_path / "mid.jsonl").write_text('{"prompt": "a", "completion": }\n')
    with pytest.raises(DataError, match=r"mid\.jsonl:1: not valid JSON \(Expecting value at column 31\)"):
        list(iter_records(tmp_path / "mid.jsonl"))


def test_reject_messages_do_not_suggest_the_setting_already_on(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    for name in ("d.jsonl", "d.csv"):
        with pytest.raises(DataError, match="set data.on_error=skip"):
            list(iter_records(tmp_path / name))
        rejects = Rejects(tmp_path / f"{name}.rejects.jsonl")
        list(iter_records(tmp_path / name, rejects=rejects))
        assert rejects.count == 1 and "on_error" not in rejects.messages[0]


def test_only_readers_whose_callers_can_skip_suggest_on_error(tmp_path, capsys):
    from optrush.cli.main import main
    from optrush.data.reader import read_records

    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n{not json\n")
    with pytest.raises(DataError, match="set data.on_error=skip"):
        list(iter_records(path))  # training and data clean honour data.on_error
    with pytest.raises(DataError, match=r"texts\.jsonl:2: not valid JSON") as err:
        list(read_records(path))
    assert "on_error" not in str(err.value)
    assert main(["score", str(tmp_path / "no_checkpoint"), "--data", str(path)]) == 2  # score has no data.on_error
    message = capsys.readouterr().err
    assert "texts.jsonl:2: not valid JSON" in message and "on_error" not in message
