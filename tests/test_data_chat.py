"""Chat records: loss on assistant turns only (with the tokenizer's template and every built-in one), column
mapping, and errors that name the record."""
import json

import pytest

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.chat import chat_segments
from optrush.data.dataset import build_datasets
from optrush.data.reader import DataError
from optrush.data.tokenizer import load_tokenizer

CONVERSATION = [{"role": "system", "content": "You cook."}, {"role": "user", "content": "Soup?"},
                {"role": "assistant", "content": "Boil water."}, {"role": "user", "content": "Then?"},
                {"role": "assistant", "content": "Add salt."}]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def trained_text(example, tok):
    return tok.decode([label for label in example.labels if label != IGNORE_INDEX])


@pytest.mark.parametrize("template,turn_end", [("tokenizer", "<|im_end|>"), ("chatml", "<|im_end|>"),
                                                ("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_only_assistant_turns_are_trained(tmp_path, tok, template, turn_end):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conv": CONVERSATION}) + "\n")
    cfg = DataConfig(path=str(path), format="chat", messages_column="conv", chat_template=template)
    (example,), _, _ = build_datasets(cfg, tok, seed=0)
    assert trained_text(example, tok) == f"Boil water.{turn_end}Add salt.{turn_end}"
    # every trained target is inside an assistant segment, and those segments are fully trained
    segments = chat_segments({"conv": CONVERSATION}, cfg=cfg, tokenizer=tok, where="x")
    assert [text for text, trained in segments if trained] == [f"Boil water.{turn_end}", f"Add salt.{turn_end}"]
    full = "".join(text for text, _ in segments)
    assert full.startswith(tok.decode(example.input_ids)) and len(full) - len(tok.decode(example.input_ids)) <= 1
    assert full.startswith(tok.bos_token) and full.count(tok.bos_token) == 1
    if template == "qwen":
        assert "You cook." in full and "helpful assistant" not in full


def test_chat_errors_name_the_record(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    cfg = DataConfig(path=str(path), format="chat", chat_template="chatml")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no assistant message"):
        build_datasets(cfg, tok, seed=0)
    with pytest.raises(DataError, match=r"missing column 'messages'"):
        chat_segments({"text": "x"}, cfg=cfg, tokenizer=tok, where="here")
