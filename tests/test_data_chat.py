"""Chat records: loss on assistant turns only (with the tokenizer's template and every built-in one), column
mapping, and errors that name the record."""
import json

import pytest

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.chat import chat_prompt, chat_segments
from optrush.data.dataset import build_datasets
from optrush.data.reader import DataError
from optrush.data.tokenizer import load_tokenizer

CONVERSATION = [{"role": "system", "content": "You cook."}, {"role": "user", "content": "Soup?"},
                {"role": "assistant", "content": "Boil water."}, {"role": "user", "content": "Then?"},
                {"role": "assistant", "content": "Add salt."}]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def llama3_tok(tokenizer_dir):
    """The test tokenizer plus the Llama 3 turn markers as single tokens (what the llama3 template needs)."""
    tok = load_tokenizer(tokenizer_dir)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    return tok


def trained_text(example, tok):
    return tok.decode([label for label in example.labels if label != IGNORE_INDEX])


@pytest.mark.parametrize("template,turn_end", [("tokenizer", "<|im_end|>"), ("chatml", "<|im_end|>"),
                                                ("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_only_assistant_turns_are_trained(tmp_path, tok, llama3_tok, template, turn_end):
    tok = llama3_tok if template == "llama3" else tok
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conv": CONVERSATION}) + "\n")
    cfg = DataConfig(path=str(path), format="chat", messages_column="conv", chat_template=template)
    (example,), _, _ = build_datasets(cfg, tok, seed=0)
    assert trained_text(example, tok) == f"Boil water.{turn_end}Add salt.{turn_end}"
    # every trained target is inside an assistant segment, and those segments are fully trained
    segments = chat_segments({"conv": CONVERSATION}, cfg=cfg, tokenizer=tok, where="x")
    assert [text for text, trained in segments if trained] == [f"Boil water.{turn_end}", f"Add salt.{turn_end}"]
    full = "".join(text for text, _ in segments)
    text = tok.decode(example.input_ids)  # all but the last token, which is only a target
    assert full.startswith(text) and len(tok.encode(full[len(text):], add_special_tokens=False)) == 1
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


ASSISTANT_FIRST = [{"role": "assistant", "content": "Hello, what shall we cook?"}, {"role": "user", "content": "Soup"},
                   {"role": "assistant", "content": "Boil water."}]


def test_a_conversation_opening_with_an_assistant_turn_trains_with_the_tokenizer_template(tmp_path, tok):
    """The turn's header is found without rendering the (empty) conversation before it, which transformers refuses;
    the example equals the built-in ChatML one (the fixture tokenizer's template is BOS + ChatML)."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": ASSISTANT_FIRST}) + "\n")
    examples = {}
    for template in ("tokenizer", "chatml"):
        (examples[template],), _, _ = build_datasets(DataConfig(path=str(path), format="chat",
                                                                chat_template=template), tok, seed=0)
    assert trained_text(examples["tokenizer"], tok) == "Hello, what shall we cook?<|im_end|>Boil water.<|im_end|>"
    assert examples["tokenizer"] == examples["chatml"]


def test_chat_template_errors_name_the_record_and_skip_catches_them(tmp_path, tokenizer_dir):
    strict = load_tokenizer(tokenizer_dir)  # a template that refuses a conversation opening with the assistant
    strict.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user turn')"
                            " }}{% endif %}" + strict.chat_template)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": ASSISTANT_FIRST}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the tokenizer's chat template cannot render this "
                                        r"conversation \(start with a user turn\)"):
        build_datasets(DataConfig(path=str(path), format="chat"), strict, seed=0)
    train, _, report = build_datasets(DataConfig(path=str(path), format="chat", on_error="skip"), strict, seed=0)
    assert len(train) == 1 and report.train.rejected == 1
    assert json.loads((tmp_path / "chat.jsonl.rejects.jsonl").read_text())["where"].endswith("chat.jsonl:2")


def test_a_built_in_template_needs_its_markers_as_single_tokens(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(DataError, match=r"data.chat_template=llama3: tokenizer .* lacks the special tokens .*"
                                        r"<\|eot_id\|>.*data.chat_template=tokenizer or chatml or qwen"):
        build_datasets(DataConfig(path=str(path), format="chat", chat_template="llama3"), tok, seed=0)


def test_a_record_that_truncation_empties_is_reported_as_truncated(tmp_path, tok):
    long_question = {"role": "user", "content": "Which soup? " * 40}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n"
                    + json.dumps({"messages": [long_question, {"role": "assistant", "content": "Leek."}]}) + "\n")
    _, _, report = build_datasets(DataConfig(path=str(path), format="chat", chat_template="chatml", max_length=40),
                                  tok, seed=0)
    assert dict(report.train.dropped) == {"no_trained_tokens": 1}
    assert "truncated 0 kept + 1 that truncation left with no trained token (no_trained_tokens)" in report.format()


@pytest.mark.parametrize("filter_", ["trim", "upper"])
def test_a_template_that_changes_the_content_trains_it_trimmed_or_fails_clearly(tmp_path, tokenizer_dir, filter_):
    changing = load_tokenizer(tokenizer_dir)
    changing.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | " + filter_ +
                              " }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                              "{% endif %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Soup?"},
                                             {"role": "assistant", "content": "  Boil water.  "}]}) + "\n")
    cfg = DataConfig(path=str(path), format="chat")
    if filter_ == "upper":
        with pytest.raises(DataError, match=r"chat\.jsonl:1: the tokenizer's chat template changes an assistant"):
            build_datasets(cfg, changing, seed=0)
        return
    (example,), _, _ = build_datasets(cfg, changing, seed=0)
    assert trained_text(example, changing) == "Boil water.<|im_end|>"



def test_chat_prompt_is_the_conversation_before_the_last_answer(tok):
    cfg = DataConfig(format="chat", chat_template="chatml")
    prompt = chat_prompt({"messages": CONVERSATION}, cfg=cfg, tokenizer=tok, where="x")
    assert prompt.endswith("Then?<|im_end|>\n<|im_start|>assistant\n") and "Boil water." in prompt
    assert "Add salt." not in prompt
    # encoding adds the BOS once, as training has it
    assert tok.encode(prompt).count(tok.bos_token_id) == 1
