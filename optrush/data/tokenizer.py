"""Train a byte-level BPE tokenizer in Hugging Face format, and load any HF tokenizer with a usable pad token.

    tok = train_tokenizer(texts, vocab_size=2048, out_dir="tok/")   # tokenizer.json + tokenizer_config.json ...
    tok = load_tokenizer("tok/")                                    # or an HF model directory

Trained tokenizers are GPT-2-style byte-level BPE (https://arxiv.org/abs/1508.07909 with byte fallback by
construction: every string round-trips exactly). Special tokens: `<|begin_of_text|>` (BOS, added by
`tokenizer.encode` like Llama 3), `<|end_of_text|>` (EOS), `<|pad|>` (PAD, distinct from EOS) and the ChatML turn
markers `<|im_start|>` / `<|im_end|>` used by the saved `chat_template`. The directory loads offline with
`transformers.AutoTokenizer.from_pretrained`.

transformers is imported inside the functions: it takes over a second to import and most of optrush.data
does not need it.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from optrush.data.reader import DataError, relative_path_note

if TYPE_CHECKING:
    from optrush.config.schema import Config
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML turns (https://github.com/openai/openai-python/blob/release-v0.28.0/chatml.md), after the BOS."""

# Tokens that model families ship for padding or could pad with harmlessly; first found (and not EOS) wins.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out_dir: str | Path) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE of at most `vocab_size` tokens (special tokens included) on `texts` and save it in
    HF format to `out_dir`; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if vocab_size < len(SPECIAL_TOKENS) + len(byte_level.alphabet()):
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least "
                         f"{len(SPECIAL_TOKENS) + len(byte_level.alphabet())} tokens (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    counted = CountedTexts(texts)
    tok.train_from_iterator(counted, trainer)
    if not counted.with_text:  # the BPE would be the byte alphabet alone, and a model trained on it learns nothing
        raise DataError(f"no text to train a tokenizer on: {counted.total} texts given, none holding any character "
                        "but whitespace; give a corpus of text")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=[IM_START, IM_END],
                                 clean_up_tokenization_spaces=False)  # exact decode: no space clean-up
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    _make_portable(out_dir)
    return load_tokenizer(out_dir)


class CountedTexts:
    """The texts of an iterable, counting those given and those holding more than whitespace as they pass."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.total, self.with_text = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.total += 1
            self.with_text += bool(text.strip())
            yield text


def _make_portable(out_dir: Path) -> None:
    """Let transformers 4.x and other HF-format readers load the directory too: a class name and a special-token
    key they know (5.x reads both as well), the chat template inline, and special_tokens_map.json."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [IM_START, IM_END])
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def holds_tokenizer(path: Path) -> bool:
    """Whether directory `path` holds an HF tokenizer (tokenizer.json, or a sentencepiece tokenizer.model)."""
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def load_config_tokenizer(cfg: Config) -> "PreTrainedTokenizerFast":
    """The tokenizer a run uses: data.tokenizer, else model.path's; an error names the key that gave the path."""
    key = "data.tokenizer" if cfg.data.tokenizer else "model.path"
    return load_tokenizer(cfg.data.tokenizer or cfg.model.path, key=key)


def load_tokenizer(path: str | Path | None, *, key: str | None = None) -> "PreTrainedTokenizerFast":
    """The HF tokenizer in directory `path`, with a pad token distinct from EOS where it had none (a warning
    says which one was chosen, or that one was added). `key`: the config key that named `path`, for the errors."""
    from transformers import AutoTokenizer

    if path is None:
        raise DataError("no tokenizer directory given: set data.tokenizer (or model.path to an HF checkpoint)")
    path = Path(path)
    if not path.is_dir():
        raise DataError(not_a_tokenizer_directory(path, key))
    if not holds_tokenizer(path):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DataError(f"{path} holds no tokenizer: expected tokenizer.json (or a sentencepiece tokenizer.model) "
                        f"with tokenizer_config.json; found: {found}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        _set_pad_token(tokenizer, path)
    return tokenizer


def not_a_tokenizer_directory(path: Path, key: str | None) -> str:
    """Why `path` cannot be loaded as a tokenizer directory (missing, or a file), naming `key` when given."""
    named = f"{key}={path}" if key else f"tokenizer path {path}"
    expected = ("give a directory holding tokenizer.json and tokenizer_config.json, e.g. one written by "
                "`optrush tokenizer train` or an HF checkpoint")
    if not path.exists():
        return f"{named}: no such directory{relative_path_note(path)}: {expected}"
    if path.name in ("tokenizer.json", "tokenizer_config.json"):
        expected = f"give the directory that holds it, {path.parent}"
    return f"{named} is a file, not a directory: {expected}"


def _set_pad_token(tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            warnings.warn(f"tokenizer {path} has no pad token; padding with the existing {candidate!r} "
                          f"(id {vocab[candidate]}). Padding is never trained or attended to.", stacklevel=3)
            return
    tokenizer.add_special_tokens({"pad_token": PAD})
    warnings.warn(f"tokenizer {path} has no pad token and no spare one; added {PAD!r} as a new token "
                  f"(id {tokenizer.pad_token_id}): the vocabulary grew to {len(tokenizer)}, so the model's "
                  "embeddings must have room for it", stacklevel=3)
