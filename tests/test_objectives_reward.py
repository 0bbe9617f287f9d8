"""Reward models on packed preference pairs: encoding, collation, ranking learned, `optrush train` + `optrush score`,
and the config checks of the alignment objectives."""
import json

import pytest
import torch

from optrush.config import ConfigError, load_config
from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import Example
from optrush.data.preference import (PairLoader, PreferencePair, build_preference_datasets, collate_pairs,
                                     encode_sequence, recipe_preference_pairs)
from optrush.data.recipes import write_jsonl
from optrush.data.tokenizer import load_tokenizer
from optrush.models.io import build_model
from optrush.models.presets import get_preset
from optrush.objectives.reward import RewardModel, apply_reward_head


def short(records, n):
    """Recipes cut to 3 ingredients and 3 steps, so a pair fits 512 tokens of the test tokenizer."""
    return [{**r, "ingredients": r["ingredients"][:3], "directions": r["directions"][:3]} for r in records[:n]]


@pytest.fixture(scope="module")
def pairs_file(recipe_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(recipe_preference_pairs(short(recipe_corpus[1], 200), seed=0), path)
    return path


def test_encode_sequence_keeps_eos_as_input_and_masks_the_prompt():
    example = encode_sequence([5, 6], [7, 8], bos_id=1, eos_id=2)
    assert example.input_ids == [1, 5, 6, 7, 8, 2]
    assert example.labels == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2, IGNORE_INDEX]


def test_collate_pairs_marks_sequences_documents_and_last_tokens():
    def ex(ids):
        return Example(input_ids=ids, labels=ids[1:] + [IGNORE_INDEX])

    a = PreferencePair(chosen=ex([1, 2, 3]), rejected=ex([1, 4]), index=7)
    b = PreferencePair(chosen=ex([1, 5]), rejected=ex([1, 6, 6, 9]), index=3)
    pairs = collate_pairs([[a, b]], packed=True, pad_id=0, max_length=12)
    assert pairs.sequence_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, -1]
    assert pairs.batch.document_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, -1]
    assert pairs.batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3, 0]
    assert pairs.last_positions.tolist() == [2, 4, 6, 10] and pairs.pair_index.tolist() == [7, 3]
    assert pairs.num_pairs == 2 and pairs.num_padding == 1
    unpacked = collate_pairs([[a], [b]], packed=False, pad_id=0, max_length=12)
    assert unpacked.input_ids.shape == (2, 6) and unpacked.last_positions.tolist() == [2, 4, 7, 11]


def test_reward_model_learns_to_rank_synthetic_preferences(pairs_file, tokenizer_dir):
    from optrush.config.schema import DataConfig

    tok = load_tokenizer(tokenizer_dir)
    train, evals, report = build_preference_datasets(DataConfig(path=str(pairs_file), max_length=512,
                                                                eval_fraction=0.2, format="preference"), tok, seed=0)
    assert report.train_pairs == len(train) == 160 and len(evals) == 40
    torch.manual_seed(0)
    model = apply_reward_head(build_model(get_preset("debug", vocab_size=len(tok)), seed=0))
    objective = RewardModel(margin=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_accuracy():
        loader = PairLoader(evals, strategy="bfd", rows=8, max_length=512, pad_id=tok.pad_token_id, seed=0,
                            shuffle=False)
        objective.pop_metrics()
        with torch.no_grad():
            for _ in range(loader.batches_per_epoch):
                objective(model, next(loader))
        return objective.pop_metrics()["accuracy"]

    before = held_out_accuracy()
    loader = PairLoader(train, strategy="bfd", rows=4, max_length=512, pad_id=tok.pad_token_id, seed=0)
    for _ in range(8):
        pairs = next(loader)
        loss_sum, _ = objective(model, pairs)
        (loss_sum / objective.units(pairs)).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_accuracy()
    assert after > 0.9 and after > before, (before, after)


def test_reward_training_runs_end_to_end_and_scores_texts(pairs_file, debug_overrides, tmp_path, capsys):
    from optrush.cli.main import main
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, f"data.path={pairs_file}", "objective=reward",
                             "data.format=preference", "data.max_length=512", "train.max_steps=3",
                             "train.lr=3e-3", "data.eval_fraction=0.1", "reward.margin=0.1"])
    summary = train(cfg)
    assert summary["steps"] == 3 and "eval_accuracy" in summary
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["pad_token_id"] == load_tokenizer(cfg.data.tokenizer).pad_token_id  # HF's batched scoring needs it
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in m for m in metrics)

    texts = tmp_path / "texts.jsonl"
    write_jsonl([{"text": "Recipe: Toast\nIngredients:\n- 1 slice bread\nDirections:\n1. Toast it."},
                 {"text": "Recipe: Toast\nIngredients:\nDirections:\n1. it. Toast"}], texts)
    capsys.readouterr()
    assert main(["score", str(tmp_path / "run" / "final"), "--data", str(texts)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["line"] for line in lines] == [1, 2] and all(isinstance(line["score"], float) for line in lines)


@pytest.mark.parametrize("overrides, message", [
    (["objective=dpo", "data.format=recipe"], "data.format=preference"),
    (["objective=sft", "data.format=preference"], "objective=reward or objective=dpo"),
    (["objective=dpo", "data.format=preference", "dpo.reference=lora_disabled"], "lora_disabled"),
    (["objective=dpo", "data.format=preference", "dpo.loss=hinge", "dpo.label_smoothing=0.1"], "label_smoothing"),
    (["objective=dpo", "data.format=preference", "dpo.beta=0"], "dpo.beta"),
    (["objective=sft", "data.format=recipe", "data.shared_prompt=true"], "data.shared_prompt"),
    (["objective=grpo", "data.format=recipe", "data.packing=bfd"], "one prompt per row"),
    (["objective=grpo", "data.format=recipe", "data.packing=none", "grpo.group_size=1"], "grpo.group_size"),
    (["objective=grpo", "data.format=recipe", "data.packing=none", "grpo.rewards=[nocolon]"], "grpo.rewards"),
])
def test_incompatible_alignment_settings_are_config_errors(overrides, message):
    base = ["model.preset=debug", "data.tokenizer=tok", "data.path=x.jsonl"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, *overrides])


def pair_record(prompt="Recipe: Soup", chosen=" Boil water, add salt.", rejected=" salt water."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_preference_bad_records_raise_with_their_line_or_are_skipped_and_written_out(tmp_path, tokenizer_dir):
    from optrush.config.schema import DataConfig
    from optrush.data.reader import DataError

    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(pair_record())] * 3 + ['{"prompt": "Recipe: Soup", "chosen": " yes", ',
                                               json.dumps({"prompt": "Recipe: Soup", "chosen": " Stir."}),
                                               json.dumps(pair_record(chosen="")),
                                               json.dumps(pair_record(rejected="  "))] + [json.dumps(pair_record())] * 2
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(path), format="preference")
    with pytest.raises(DataError, match=r"pairs\.jsonl:4: not valid JSON .*data\.on_error=skip"):
        build_preference_datasets(cfg, tok, seed=0)
    for line in (5, 6, 7):  # a missing column, an empty chosen, a blank rejected completion
        path.write_text("\n".join(lines[:3] + lines[line - 1:line]) + "\n")
        with pytest.raises(DataError, match=r"pairs\.jsonl:4: .*(missing or not a string|is empty)"):
            build_preference_datasets(cfg, tok, seed=0)

    path.write_text("\n".join(lines) + "\n")
    train, _, report = build_preference_datasets(DataConfig(path=str(path), format="preference", on_error="skip"),
                                                 tok, seed=0)
    assert len(train) == 5 and report.train.rejected == 4
    rejects = [json.loads(line) for line in (tmp_path / "pairs.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in rejects] == ["4", "5", "6", "7"]
    assert "skipped 4 malformed rows (data.on_error=skip)" in report.format()
    assert report.as_dict()["train"]["rejected"] == 4


def test_shared_prompt_pairs_are_length_checked_as_packed(tmp_path, tokenizer_dir):
    """data.shared_prompt=true stores the prompt once: a pair that fits that way is kept, not dropped or an error."""
    from optrush.config.schema import DataConfig
    from optrush.data.reader import DataError

    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "pairs.jsonl"
    write_jsonl([pair_record(prompt="Recipe: Tomato soup with garlic and pepper")], path)
    (pair,), _, _ = build_preference_datasets(DataConfig(path=str(path), format="preference"), tok, seed=0)
    assert pair.shared_length < len(pair)
    shared = DataConfig(path=str(path), format="preference", max_length=pair.shared_length, too_long="error",
                        shared_prompt=True)
    train, _, report = build_preference_datasets(shared, tok, seed=0)
    assert len(train) == 1 and report.tokens == pair.shared_length
    with pytest.raises(DataError, match=rf"pairs\.jsonl:1: the pair takes {len(pair)} tokens \(chosen \+ rejected\)"):
        build_preference_datasets(DataConfig(path=str(path), format="preference", max_length=pair.shared_length,
                                             too_long="error"), tok, seed=0)


def test_pairs_whose_completions_are_identical_are_dropped_and_counted(tmp_path, tokenizer_dir):
    from optrush.config.schema import DataConfig
    from optrush.data.reader import DataError

    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "pairs.jsonl"
    write_jsonl([pair_record(), pair_record(rejected=" Boil water, add salt.")], path)
    train, _, report = build_preference_datasets(DataConfig(path=str(path), format="preference"), tok, seed=0)
    assert len(train) == 1 and dict(report.train.dropped) == {"identical": 1}
    assert "dropped 1 as identical (chosen and rejected encode alike: nothing to learn)" in report.format()
    write_jsonl([pair_record(rejected=" Boil water, add salt.")] * 2, path)
    with pytest.raises(DataError, match=r"read 2 records; all 2 pairs have chosen and rejected completions that "
                                        r"encode alike"):
        build_preference_datasets(DataConfig(path=str(path), format="preference"), tok, seed=0)


@pytest.mark.parametrize("family", [{}, {"model_type": "qwen2", "qkv_bias": True}])
def test_reward_model_saves_as_a_sequence_classifier_that_transformers_loads(family, tokenizer_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from optrush.models.io import load_model, load_state_into, save_model
    from optrush.objectives.reward import load_reward_model, score_texts

    tok = load_tokenizer(tokenizer_dir)
    model = apply_reward_head(build_model(get_preset("debug", vocab_size=len(tok), **family), seed=0),
                              pad_token_id=tok.pad_token_id)
    save_model(model, tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id

    texts = ["Recipe: Toast\nIngredients:\n- 1 slice bread", "Recipe: Tea", "Recipe: Soup\nDirections:\n1. Boil."]
    ours = score_texts(load_reward_model(tmp_path / "rm"), tok, texts)
    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and hf.config.num_labels == 1
    rows = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False), tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long()).logits[:, 0]
    torch.testing.assert_close(theirs, torch.tensor(ours), atol=1e-5, rtol=1e-5)

    load_state_into(apply_reward_head(build_model(get_preset("debug", vocab_size=len(tok), **family), seed=1)),
                    tmp_path / "rm")  # a resume reads the new layout
    old = tmp_path / "old"  # the layout written before: a causal-LM config whose lm_head is (1, dim)
    old.mkdir()
    tensors = load_file(tmp_path / "rm" / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, old / "model.safetensors")
    architecture = config["architectures"][0].replace("ForSequenceClassification", "ForCausalLM")
    (old / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    assert score_texts(load_reward_model(old), tok, texts) == pytest.approx(ours, abs=1e-6)
    for path in (tmp_path / "rm", old):
        with pytest.raises(ValueError, match="reward model .*optrush score"):
            load_model(path)  # what `optrush generate` loads


def test_score_reads_a_pair_files_sides_as_training_encodes_them(pairs_file, debug_overrides, tmp_path, capsys):
    """`--prompt-column` scores prompt + completion tokenized apart (as a pair's side is), not as one text; a text
    longer than the model's context is named by its file and line, not by a config key score has no use for."""
    from optrush.cli.main import main
    from optrush.config.schema import DataConfig
    from optrush.objectives.reward import load_reward_model
    from optrush.train import train

    cfg = load_config(None, [*debug_overrides, f"data.path={pairs_file}", "objective=reward",
                             "data.format=preference", "data.max_length=512", "train.max_steps=1"])
    train(cfg)
    final = tmp_path / "run" / "final"
    tok = load_tokenizer(cfg.data.tokenizer)
    pairs, _, _ = build_preference_datasets(DataConfig(path=str(pairs_file), max_length=512, format="preference"),
                                            tok, seed=0)
    model = load_reward_model(final)
    with torch.no_grad():
        expected = [float(model(torch.tensor([p.chosen.input_ids]))[0, -1, 0]) for p in pairs[:3]]
    few = tmp_path / "few.jsonl"
    few.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:3]))
    capsys.readouterr()
    assert main(["score", str(final), "--data", str(few), "--prompt-column", "prompt", "--column", "chosen"]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert scores == pytest.approx(expected, abs=1e-5)

    write_jsonl([{"text": "short"}, {"text": "Toast it. " * 3000}], tmp_path / "long.jsonl")
    assert main(["score", str(final), "--data", str(tmp_path / "long.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'long.jsonl'}:2: " in err and "max_seq_len" in err and "data.max_length" not in err
