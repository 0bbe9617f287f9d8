"""Chat records (a list of system/user/assistant messages) -> text segments -> an Example trained on assistant
turns only.

    segments = chat_segments(record, cfg=cfg.data, tokenizer=tok, where="chat.jsonl:3")
    # [("<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n", False),
    #  ("The answer.<|im_end|>", True), ("\\n", False)]
    example = segments_example([tok.encode(t, add_special_tokens=False) for t, _ in segments],
                               [trained for _, trained in segments], bos_id=tok.bos_token_id)

`data.chat_template` picks the text: `tokenizer` renders with the tokenizer's own Jinja `chat_template`
(`apply_chat_template`); each assistant turn is found as the difference between the conversation rendered up to
that turn with a generation prompt and rendered through it (for a conversation that opens with an assistant turn,
the text the template puts before its content), so the template must render a prefix of a conversation as a prefix
of its text (the common templates do; others get a clear error). The built-in templates, whose markers the
tokenizer must hold as single tokens (`check_chat_template`, at start-up; else they would be trained as text):

- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message
  (https://github.com/openai/openai-python/blob/release-v0.28.0/chatml.md)
- `qwen`: ChatML with Qwen2's default system message when the conversation has none
- `llama3`: `<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` per
  message (https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/)

The trained segment of an assistant turn is its content plus the turn's end marker (`<|im_end|>`, `<|eot_id|>`),
so the model learns to stop; the header before it and all other turns are masked. Segments are tokenized
separately and concatenated, so a merge cannot blur a boundary. The tokenizer's BOS is prepended unless the text
already starts with it. No EOS is appended: the end-of-turn marker ends the document.
"""
from __future__ import annotations

import re

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import Example
from optrush.data.reader import DataError

ROLES = ("system", "user", "assistant")
CONTENT_MARK = "OPTRUSH-CONTENT-MARK"
"""Stands for a turn's content when the text a template puts before a turn is wanted."""
QWEN_SYSTEM = "You are a helpful assistant."
BUILT_IN = {  # template -> (text before everything, header of a role, end of a turn)
    "chatml": ("", "<|im_start|>{role}\n", "<|im_end|>\n"),
    "qwen": ("", "<|im_start|>{role}\n", "<|im_end|>\n"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
}


def chat_messages(record: dict, *, cfg: DataConfig, where: str) -> list[dict]:
    """The record's messages, checked: a list of {"role", "content"} with known roles and at least one assistant."""
    column = cfg.messages_column
    if column not in record:
        found = ", ".join(repr(c) for c in record) or "none"
        raise DataError(f"{where}: missing column {column!r} (columns found: {found}); set data.messages_column")
    messages = record[column]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: column {column!r} must hold a non-empty list of messages "
                        "[{\"role\": \"user\", \"content\": \"...\"}, ...]")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} of {column!r} is {str(message)[:60]!r}; each message needs a "
                            f"role ({', '.join(ROLES)}) and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message in {column!r}: nothing would be trained")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_segments(record: dict, *, cfg: DataConfig, tokenizer, where: str) -> list[tuple[str, bool]]:
    """(text, trained) segments of a chat record; the trained ones are the assistant turns."""
    messages = chat_messages(record, cfg=cfg, where=where)
    if cfg.chat_template == "tokenizer":
        segments = _tokenizer_segments(messages, tokenizer=tokenizer, where=where)
    else:
        segments = _built_in_segments(messages, template=cfg.chat_template)
    bos = tokenizer.bos_token
    if bos and tokenizer.bos_token_id is not None and not segments[0][0].startswith(bos):
        segments.insert(0, (bos, False))
    return [(text, trained) for text, trained in segments if text]


def chat_prompt(record: dict, *, cfg: DataConfig, tokenizer, where: str) -> str:
    """The conversation up to its last assistant turn's content, rendered as in training: what the model reads
    before it answers (to sample an answer). A leading BOS the tokenizer adds when encoding is left out."""
    segments = chat_segments(record, cfg=cfg, tokenizer=tokenizer, where=where)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    text = "".join(text for text, _ in segments[:last])
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode("")[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def _built_in_segments(messages: list[dict], *, template: str) -> list[tuple[str, bool]]:
    start, header, end = BUILT_IN[template]
    if template == "qwen" and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN_SYSTEM}, *messages]
    segments, pending = [], start
    for message in messages:
        pending += header.format(role=message["role"])
        if message["role"] == "assistant":
            stop = end.rstrip("\n")  # the newline after the marker belongs to the next turn's context
            segments += [(pending, False), (message["content"] + stop, True)]
            pending = end[len(stop):]
        else:
            pending += message["content"] + end
    return segments + [(pending, False)]


def check_chat_template(cfg: DataConfig, tokenizer) -> None:
    """Start-up check of data.chat_template against the tokenizer: `tokenizer` needs the tokenizer's own template,
    a built-in one needs each of its markers to be one token of the tokenizer (else the marker is encoded as plain
    text and the model learns to spell its end of turn)."""
    if (problem := _template_problem(cfg.chat_template, tokenizer)) is None:
        return
    usable = [name for name in ("tokenizer", *BUILT_IN) if _template_problem(name, tokenizer) is None]
    raise DataError(f"data.chat_template={cfg.chat_template}: tokenizer {tokenizer.name_or_path!r} {problem}; use "
                    "the model's own tokenizer (data.tokenizer)"
                    + (f", or a template this tokenizer can encode: data.chat_template={' or '.join(usable)}"
                       if usable else ""))


def _template_problem(template: str, tokenizer) -> str | None:
    """Why `tokenizer` cannot encode `template`, or None when it can."""
    if template == "tokenizer":
        return None if tokenizer.chat_template else "has no chat_template"
    markers = dict.fromkeys(re.findall(r"<\|[a-z_]+\|>", "".join(BUILT_IN[template])))
    missing = [m for m in markers if len(tokenizer.encode(m, add_special_tokens=False)) != 1]
    return (f"lacks the special tokens of that template ({', '.join(missing)} would be encoded as plain text, so "
            "the model would learn to spell them)") if missing else None


def _tokenizer_segments(messages: list[dict], *, tokenizer, where: str) -> list[tuple[str, bool]]:
    from jinja2 import TemplateError  # apply_chat_template needs jinja2; optrush.data otherwise does not

    def render(conversation: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except (TemplateError, ValueError) as err:  # e.g. a template that demands alternating user/assistant turns
            raise DataError(f"{where}: the tokenizer's chat template cannot render this conversation ({err}); fix "
                            "the record or set data.chat_template to llama3, chatml or qwen") from None

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(messages[:i + 1], False)
        if i:
            before = render(messages[:i], True)
        else:  # nothing before the turn to render (transformers refuses an empty conversation): cut at its content
            before = render([{**message, "content": CONTENT_MARK}], False).partition(CONTENT_MARK)[0]
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's start as a "
                            "prefix of its text, so assistant turns cannot be located; set data.chat_template "
                            "to llama3, chatml or qwen")
        turn = through[len(before):]
        content_end = _content_end(turn, message["content"], where=where)
        trained = turn[:content_end] + _end_marker(turn[content_end:], tokenizer)
        segments += [(before[len(done):], False), (trained, True)]
        done = before + trained
    full = render(messages, False)
    return segments + [(full[len(done):], False)]


def _content_end(turn: str, content: str, *, where: str) -> int:
    """Where the message's content ends in its rendered turn (templates may trim it, as Llama 3's does)."""
    for text in (content, content.strip()):
        if (start := turn.find(text)) >= 0:
            return start + len(text)
    raise DataError(f"{where}: the tokenizer's chat template changes an assistant turn's text, so its trained part "
                    "cannot be located; set data.chat_template to llama3, chatml or qwen")


def _end_marker(rest: str, tokenizer) -> str:
    """The special token that closes the turn (e.g. <|im_end|>), when the text after the content starts with one."""
    for token in tokenizer.all_special_tokens:
        if token and rest.startswith(token):
            return token
    return ""


def segments_example(segment_ids: list[list[int]], trained: list[bool]) -> Example:
    """Concatenate the segments' ids and shift once; a target is trained when its token is in a trained segment."""
    sequence = [t for ids in segment_ids for t in ids]
    flags = [flag for ids, flag in zip(segment_ids, trained) for _ in ids]
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(sequence[1:], flags[1:])]
    return Example(input_ids=sequence[:-1], labels=labels)
