"""`optrush eval` on a file with bad rows: the error's advice (data.on_error=skip) is one eval takes, and under it
the bad rows are counted in the report and written to the rejects file."""
import json

import pytest

from optrush.cli.main import main

EVAL = ["--samples", "3", "--max-new-tokens", "4", "--max-length", "128", "--device", "cpu"]


@pytest.fixture
def ckpt(tiny_checkpoint):
    return tiny_checkpoint[0]


@pytest.fixture
def bad_data(recipe_corpus, tmp_path):
    """Four good recipes with a line that is not JSON and a record without the recipe columns among them."""
    good = recipe_corpus[0].read_text().splitlines(keepends=True)[:4]
    path = tmp_path / "heldout.jsonl"
    path.write_text(good[0] + "{not json\n" + good[1] + '{"foo": 1}\n' + "".join(good[2:]))
    return path


def test_the_advice_of_a_data_error_works_for_eval(ckpt, bad_data, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--data", str(bad_data), *EVAL]) == 2
    err = capsys.readouterr().err
    assert "heldout.jsonl:2: not valid JSON" in err and "set data.on_error=skip" in err
    # the advice, taken as given
    out = tmp_path / "report.md"
    assert main(["eval", str(ckpt), "--data", str(bad_data), "data.on_error=skip", *EVAL, "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["examples"] == 4 and report["rejected"] == 2 and len(report["samples"]) == 3
    rejects = bad_data.with_name("heldout.jsonl.rejects.jsonl")
    assert report["rejects_path"] == str(rejects) and len(rejects.read_text().splitlines()) == 2
    assert f"skipped 2 malformed rows (data.on_error=skip), written to {rejects}" in out.read_text()


def test_eval_refuses_overrides_it_does_not_apply(ckpt, bad_data, capsys):
    assert main(["eval", str(ckpt), "--data", str(bad_data), "train.lr=1", *EVAL]) == 2
    assert "override train.lr=1: optrush eval takes only data.on_error" in capsys.readouterr().err


def test_eval_samples_chat_records_from_their_last_user_turn(ckpt, tmp_path):
    data = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "Soup?"}, {"role": "assistant", "content": "Boil water."}]
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    out = tmp_path / "report.md"
    assert main(["eval", str(ckpt), "--data", str(data), "--format", "chat", *EVAL, "--out", str(out)]) == 0
    (sample,) = json.loads(out.with_suffix(".json").read_text())["samples"]
    assert sample["prompt"].endswith("Soup?<|im_end|>\n<|im_start|>assistant\n")
