"""Chat records (a list of system/user/assistant messages) -> text segments -> an Example trained on assistant
turns only.

    segments = chat_segments(record, cfg=cfg.data, tokenizer=tok, where="chat.jsonl:3")
    # [("<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n", False),
    #  ("The answer.<|im_end|>", True), ("\\n", False)]
    example = segments_example([tok.encode(t, add_special_tokens=False) for t, _ in segments],
                               [trained for _, trained in segments], bos_id=tok.bos_token_id)

`data.chat_template` picks the text: `tokenizer` renders with the tokenizer's own Jinja `chat_template`
(`apply_chat_template`); each assistant turn is found as the difference between the conversation rendered up to
that turn with a generation prompt and rendered through it, so the template must render a prefix of a conversation
as a prefix of its text (the common templates do; others get a clear error). The built-in templates:

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

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import Example
from optrush.data.reader import DataError

ROLES = ("system", "user", "assistant")
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


def _tokenizer_segments(messages: list[dict], *, tokenizer, where: str) -> list[tuple[str, bool]]:
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template; set data.chat_template to "
                        "llama3, chatml or qwen")

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's start as a "
                            "prefix of its text, so assistant turns cannot be located; set data.chat_template "
                            "to llama3, chatml or qwen")
        turn = through[len(before):]
        content_end = turn.find(message["content"]) + len(message["content"])
        trained = turn[:content_end] + _end_marker(turn[content_end:], tokenizer)
        segments += [(before[len(done):], False), (trained, True)]
        done = before + trained
    full = render(len(messages), False)
    return segments + [(full[len(done):], False)]


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
