"""How one record becomes one training example: text rendering, tokenization, prompt masking, the one shift.

    example = encode_record({"prompt": "2+2=", "completion": "4"}, cfg=cfg.data, tokenizer=tok, where="a.jsonl:3")

The token sequence is `[bos] + prompt + completion + [eos]` (no BOS when the tokenizer has none, e.g. Qwen).
Prompt and completion are tokenized separately and their ids concatenated, so the boundary between them is exact
(a merge across it could otherwise hide where the prompt ends). Labels are shifted here, once (see
`optrush.data.batch`): `input_ids = seq[:-1]`, `labels = seq[1:]`, with every target that is a prompt token set to
IGNORE_INDEX. Formats (`DataConfig.format`):

- `text`: the `text_column` is the whole document; every token is trained.
- `prompt_completion`: `prompt_column` then `completion_column`; the loss covers the completion and the EOS.
- `recipe`: a RecipeNLG-style record rendered by `optrush.data.recipes` (prompt: the title line; completion:
  ingredients and directions); the loss covers the completion and the EOS.

The EOS is always a trained target, so a model learns where documents end. `len(example)` is the number of model
positions it takes (BOS included, EOS only as the last target); that is what `data.max_length` bounds.
"""
from __future__ import annotations

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.examples import Example
from optrush.data.reader import DataError
from optrush.data.recipes import recipe_completion, recipe_prompt

RECIPE_COLUMNS = {"title": str, "ingredients": list, "directions": list}


def encode_record(record: dict, *, cfg: DataConfig, tokenizer, where: str) -> Example:
    """One record -> one Example (not yet cut to `cfg.max_length`; `optrush.data.dataset` does that)."""
    prompt, completion = render(record, cfg=cfg, where=where)
    bos_id, eos_id = special_ids(tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) if completion else []
    return build_example(prompt_ids, completion_ids, bos_id=bos_id, eos_id=eos_id)


def render(record: dict, *, cfg: DataConfig, where: str) -> tuple[str, str]:
    """(prompt text, completion text) of a record; the prompt is '' for the `text` format."""
    if cfg.format == "text":
        return "", _string_column(record, cfg.text_column, where=where, key="data.text_column")
    if cfg.format == "prompt_completion":
        return (_string_column(record, cfg.prompt_column, where=where, key="data.prompt_column"),
                _string_column(record, cfg.completion_column, where=where, key="data.completion_column"))
    if cfg.format == "recipe":
        for column, kind in RECIPE_COLUMNS.items():
            _check_column(record, column, where=where, key=None)
            if record[column] is None:
                raise null_value(where, column)
            if not isinstance(record[column], kind):
                raise DataError(f"{where}: column {column!r} holds a {type(record[column]).__name__}, a recipe "
                                f"needs a {kind.__name__} there (title: string; ingredients, directions: lists)")
        return recipe_prompt(record), recipe_completion(record)
    raise ValueError(single_example_formats_only(cfg.format))


def single_example_formats_only(data_format: str) -> str:
    """Why `render` cannot take a `data.format`: chat records have their own renderer, preference records are
    pairs (a caller that reaches here with them is a command that handles single examples only)."""
    if data_format == "preference":
        return ("data.format=preference holds preference pairs, which only objective=reward or dpo training reads "
                "(optrush.data.preference); this command takes single examples (data.format=text, "
                "prompt_completion, recipe or chat)")
    return f"data.format={data_format!r} is not rendered as a prompt and a completion (chat: optrush.data.chat)"


def build_example(prompt_ids: list[int], completion_ids: list[int], *, bos_id: int | None,
                  eos_id: int) -> Example:
    """Concatenate, shift once, and mask the targets that are prompt tokens."""
    prefix = [bos_id] if bos_id is not None else []
    sequence = prefix + prompt_ids + completion_ids + [eos_id]
    # seq[j] is the target at position j-1; positions whose target is a prompt token are masked
    masked = max(0, len(prefix) + len(prompt_ids) - 1)
    labels = [IGNORE_INDEX] * masked + sequence[masked + 1:]
    return Example(input_ids=sequence[:-1], labels=labels)


def special_ids(tokenizer) -> tuple[int | None, int]:
    """(BOS id or None when the tokenizer has no BOS, EOS id)."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; every example ends with one: "
                        "set eos_token in its tokenizer_config.json")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _string_column(record: dict, column: str, *, where: str, key: str) -> str:
    _check_column(record, column, where=where, key=key)
    value = record[column]
    if value is None:
        raise null_value(where, column)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds a {type(value).__name__}, expected a string; point "
                        f"{key} at a text column")
    return value


def null_value(where: str, column: str) -> DataError:
    """A null cell (Parquet/Arrow null, JSON null): the column is right, the row's value is missing. The message is
    also what a rejects file records, so it states what data.on_error=skip does rather than suggesting it."""
    return DataError(f"{where}: column {column!r} is null; fill it in, or drop such rows with data.clean.nonempty: "
                     f"[{column}] (counted as empty); with data.on_error=skip they go to the rejects file")


def _check_column(record: dict, column: str, *, where: str, key: str | None) -> None:
    if column not in record:
        found = ", ".join(repr(c) for c in record) or "none"
        hint = f"set {key} to the right column" if key else "recipe records need title, ingredients, directions"
        raise DataError(f"{where}: missing column {column!r} (columns found: {found}); {hint}")
