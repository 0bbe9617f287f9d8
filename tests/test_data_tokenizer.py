"""Tokenizer training/saving/loading (offline, through transformers.AutoTokenizer), record encoding and masking,
and the file:line errors of the reader and the formats."""
import json

import pytest

from optrush.config.schema import DataConfig
from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import encode_record
from optrush.data.reader import DataError, read_json, read_jsonl, read_records
from optrush.data.recipes import recipe_completion, recipe_prompt
from optrush.data.tokenizer import BOS, EOS, PAD, load_tokenizer, train_tokenizer

TRICKY = "Recipe: Crème brûlée 🍮\n\n  two  spaces,\ttab, 中文, trailing space \r\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_trained_tokenizer_round_trips_through_autotokenizer(tokenizer_dir, tok):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)  # conftest sets HF_HUB_OFFLINE
    assert len(hf) == len(tok) <= 512
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert len({hf.bos_token_id, hf.eos_token_id, hf.pad_token_id}) == 3
    ids = hf.encode(TRICKY)
    assert ids[0] == hf.bos_token_id and hf.encode(TRICKY, add_special_tokens=False) == ids[1:]
    assert hf.decode(ids, skip_special_tokens=True) == TRICKY  # byte-level: exact, whatever the text
    assert tok.decode(tok.encode(TRICKY, add_special_tokens=False)) == TRICKY
    chat = hf.apply_chat_template([{"role": "user", "content": "Soup?"}], tokenize=False, add_generation_prompt=True)
    assert chat == f"{BOS}<|im_start|>user\nSoup?<|im_end|>\n<|im_start|>assistant\n"
    assert hf.convert_ids_to_tokens(hf.encode("<|im_start|>", add_special_tokens=False)) == ["<|im_start|>"]


def test_load_tokenizer_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer path .*nowhere: no such directory"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds no tokenizer: expected tokenizer.json.*found: config.json"):
        load_tokenizer(tmp_path)


def test_missing_pad_token_uses_a_spare_one_or_adds_one_and_warns(tokenizer_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # our own tokenizer with pad_token removed from its config: <|pad|> is still in the vocabulary
    spare = tmp_path / "spare"
    spare.mkdir()
    (spare / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (spare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no pad token; padding with the existing '<|pad|>'"):
        loaded = load_tokenizer(spare)
    assert loaded.pad_token == PAD and loaded.pad_token_id != loaded.eos_token_id

    # a tokenizer with only BOS/EOS: a pad token is added, never EOS reused
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    bare.train_from_iterator(["some soup"] * 5, trainers.BpeTrainer(vocab_size=270, special_tokens=["<s>", "</s>"],
                                                                    show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bare, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="added '<|pad|>' as a new token"):
        added = load_tokenizer(tmp_path / "bare")
    assert added.pad_token == PAD and added.pad_token_id == len(added) - 1 != added.eos_token_id


def test_encode_masks_the_prompt_and_trains_eos(tok):
    cfg = DataConfig(format="prompt_completion", prompt_column="q", completion_column="a")
    example = encode_record({"q": "Recipe: Soup\n", "a": "Ingredients:\n- salt"}, cfg=cfg, tokenizer=tok, where="x:1")
    prompt = tok.encode("Recipe: Soup\n", add_special_tokens=False)
    completion = tok.encode("Ingredients:\n- salt", add_special_tokens=False)
    assert example.input_ids == [tok.bos_token_id] + prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert example.num_trained == len(completion) + 1

    text = encode_record({"text": "Stir well."}, cfg=DataConfig(format="text"), tokenizer=tok, where="x:2")
    ids = tok.encode("Stir well.", add_special_tokens=False)
    assert text.input_ids == [tok.bos_token_id] + ids and text.labels == ids + [tok.eos_token_id]

    record = {"title": "Easy Soup", "ingredients": ["1 onion"], "directions": ["Chop the onion."], "NER": ["onion"]}
    recipe = encode_record(record, cfg=DataConfig(format="recipe"), tokenizer=tok, where="x:3")
    n_prompt = len(tok.encode(recipe_prompt(record), add_special_tokens=False))
    assert recipe.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(recipe.labels[n_prompt:-1]) == recipe_completion(record)
    assert recipe.labels[-1] == tok.eos_token_id


def test_missing_or_wrong_column_names_file_line_and_columns(tok):
    cfg = DataConfig(format="prompt_completion")
    with pytest.raises(DataError, match=r"train.jsonl:7: missing column 'completion' \(columns found: 'prompt', "
                                        r"'answer'\); set data.completion_column"):
        encode_record({"prompt": "a", "answer": "b"}, cfg=cfg, tokenizer=tok, where="train.jsonl:7")
    with pytest.raises(DataError, match="train.jsonl:8: column 'prompt' holds a list, expected a string"):
        encode_record({"prompt": ["a"], "completion": "b"}, cfg=cfg, tokenizer=tok, where="train.jsonl:8")
    with pytest.raises(DataError, match="r.jsonl:2: missing column 'directions'"):
        encode_record({"title": "t", "ingredients": []}, cfg=DataConfig(format="recipe"), tokenizer=tok,
                      where="r.jsonl:2")


def test_reader_streams_records_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert list(read_jsonl(good)) == [(1, {"text": "a"}), (3, {"text": "b"})]  # blank lines skipped, numbered
    array = tmp_path / "data.json"
    array.write_text(' [{"text": "a"}, {"text": "b"}]')
    assert list(read_records(array)) == [(1, {"text": "a"}), (2, {"text": "b"})]
    lines_json = tmp_path / "lines.json"  # JSON lines under a .json name (datasets.to_json writes these)
    lines_json.write_text('{"text": "a"}\n')
    assert list(read_records(lines_json)) == [(1, {"text": "a"})]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b",\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON .*fix or delete this line"):
        list(read_jsonl(bad))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"scalar.jsonl:2: expected a JSON object .*got an array"):
        list(read_records(scalar))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        list(read_jsonl(latin))
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match="item 2: a number in the JSON array"):
        list(read_json(mixed))
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_train_tokenizer_rejects_a_vocab_too_small_for_bytes(tmp_path):
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(["a"], vocab_size=100, out_dir=tmp_path)
