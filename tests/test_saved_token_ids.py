"""A saved model names its tokenizer's special tokens: config.json's bos/eos/pad ids (from the tokenizer when the
model had none, as a preset has none) and generation_config.json, so transformers' generate stops at EOS."""
import json

import pytest

from optrush.config.schema import PeftConfig
from optrush.data.tokenizer import load_tokenizer
from optrush.models.io import adopt_token_ids, build_model, load_model, save_model
from optrush.models.presets import get_preset
from optrush.objectives.reward import apply_reward_head
from optrush.peft import apply_lora, save_merged

TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def debug_model(tok):
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    assert model.args.eos_token_id is None  # a preset knows no tokenizer
    return model


def test_saved_config_and_generation_config_name_the_tokenizers_ids(tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tokenizer_dir)
    model = debug_model(tok)
    adopt_token_ids(model, tok)
    save_model(model, tmp_path / "full")
    merged = apply_lora(debug_model(tok), PeftConfig(method="lora", r=4))
    adopt_token_ids(merged, tok)
    save_merged(merged, tmp_path / "merged")  # what a LoRA run's final/ holds

    expected = {key: getattr(tok, key) for key in TOKEN_IDS}
    assert None not in expected.values()
    for saved in (tmp_path / "full", tmp_path / "merged"):
        config = json.loads((saved / "config.json").read_text())
        assert {key: config[key] for key in TOKEN_IDS} == expected
        assert transformers.GenerationConfig.from_pretrained(saved).eos_token_id == tok.eos_token_id
        hf = transformers.AutoModelForCausalLM.from_pretrained(saved)
        assert hf.generation_config.eos_token_id == hf.config.eos_token_id == tok.eos_token_id
        assert load_model(saved).args.eos_token_id == tok.eos_token_id  # and our own loader reads them back


def test_ids_the_model_knows_are_kept_and_a_reward_model_gets_no_generation_config(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    model = debug_model(tok)
    model.args.eos_token_id = [tok.eos_token_id, 7]  # e.g. a chat model's config: end of text and end of turn
    adopt_token_ids(model, tok)
    assert model.args.eos_token_id == [tok.eos_token_id, 7] and model.args.bos_token_id == tok.bos_token_id

    reward = apply_reward_head(debug_model(tok), pad_token_id=tok.pad_token_id)
    adopt_token_ids(reward, tok)
    save_model(reward, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert not (tmp_path / "rm" / "generation_config.json").exists()


def test_a_trained_models_final_names_the_tokenizers_ids(debug_overrides, tmp_path):
    from transformers import GenerationConfig

    from optrush.config import load_config
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, "train.max_steps=2"])
    train(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert {k: config[k] for k in TOKEN_IDS} == {k: getattr(tok, k) for k in TOKEN_IDS}
    assert GenerationConfig.from_pretrained(final).eos_token_id == tok.eos_token_id
