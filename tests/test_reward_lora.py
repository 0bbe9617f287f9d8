"""A reward model trained with LoRA/QLoRA: its random scalar head trains beside the adapters (PEFT's
`modules_to_save=["score"]`), the adapter holds that head in PEFT's SEQ_CLS format, and every saved form (adapter,
merged final/, `optrush export --merge`, peft over transformers) scores as the trained model does."""
import json

import pytest
import torch
from safetensors.torch import load_file

from optrush.config import load_config
from optrush.config.schema import DataConfig, PeftConfig
from optrush.data.preference import PairLoader, build_preference_datasets, recipe_preference_pairs
from optrush.data.recipes import write_jsonl
from optrush.data.tokenizer import load_tokenizer
from optrush.models.io import build_model, load_model, save_model
from optrush.models.presets import get_preset
from optrush.objectives.reward import RewardModel, apply_reward_head, load_reward_model, score_texts
from optrush.peft import apply_lora, save_adapter, save_merged
from optrush.peft.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter

HEAD_KEY = "base_model.model.score.weight"  # where peft 0.21 saves a modules_to_save "score" head
TEXTS = ["Recipe: Toast\nIngredients:\n- 1 slice bread\nDirections:\n1. Toast it.", "Recipe: Tea",
         "Recipe: Soup\nDirections:\n1. Boil."]


@pytest.fixture(scope="module")
def pairs_file(recipe_corpus, tmp_path_factory):
    """Preference pairs of short recipes (3 ingredients, 3 steps: a pair fits 512 tokens)."""
    records = [{**r, "ingredients": r["ingredients"][:3], "directions": r["directions"][:3]}
               for r in recipe_corpus[1][:40]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(recipe_preference_pairs(records, seed=0), path)
    return path


def trained_reward_lora(model, tok, pairs_file, *, quantize: str):
    """`model` given a reward head and LoRA adapters (over an nf4 base for QLoRA), trained 2 steps with a high
    learning rate; returns (model, its head before training)."""
    torch.manual_seed(0)  # the head and the adapters' A matrices draw from the global generator
    apply_reward_head(model, pad_token_id=tok.pad_token_id)
    apply_lora(model, PeftConfig(method="lora", r=4, alpha=8, quantize=quantize))
    initial_head = model.output.weight.detach().clone()
    train, _, _ = build_preference_datasets(DataConfig(path=str(pairs_file), max_length=512, format="preference"),
                                            tok, seed=0)
    loader = PairLoader(train, strategy="none", rows=2, max_length=512, pad_id=tok.pad_token_id, seed=0)
    objective = RewardModel()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        pairs = next(loader)
        loss_sum, _ = objective(model, pairs)
        (loss_sum / objective.units(pairs)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), initial_head


def save_preset_run_base(model, initial_head, path, tok, *, quantize: str):
    """base/ as the loop writes it for a model.preset run: the frozen base with the head it started from."""
    from optrush.peft.export import preset_base_fingerprint, save_preset_base

    with torch.no_grad():
        trained_head = model.output.weight.clone()
        model.output.weight.copy_(initial_head)
        fingerprint = preset_base_fingerprint(model, preset="debug", seed=0, quantize=quantize)
        save_preset_base(model, path, tok, fingerprint=fingerprint)
        model.output.weight.copy_(trained_head)
    return path


@pytest.mark.parametrize("quantize, base", [("none", "preset"), ("nf4", "preset"), ("nf4", "model.path")])
def test_lora_reward_head_trains_and_every_saved_form_scores_as_the_trained_model(quantize, base, pairs_file,
                                                                                    tokenizer_dir, tmp_path):
    from optrush.cli.main import main

    tok = load_tokenizer(tokenizer_dir)
    if base == "preset":  # built quantized, as the loop builds model.preset with peft.quantize
        model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0, quantize=quantize)
    else:  # a language model loaded from its directory and quantized, its head replaced
        save_model(build_model(get_preset("debug", vocab_size=len(tok)), seed=0), tmp_path / "lm")
        model = load_model(tmp_path / "lm", quantize=quantize)
    model, initial_head = trained_reward_lora(model, tok, pairs_file, quantize=quantize)
    assert model.output.weight.requires_grad
    assert not torch.equal(model.output.weight, initial_head)  # the head trained
    expected = score_texts(model, tok, TEXTS)

    base_dir = save_preset_run_base(model, initial_head, tmp_path / "base", tok, quantize=quantize) \
        if base == "preset" else tmp_path / "lm"
    save_merged(model, tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    adapter = save_adapter(model, tmp_path / "final" / "adapter", base_model_path=base_dir)

    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    torch.testing.assert_close(tensors[HEAD_KEY], model.output.weight.detach(), rtol=0, atol=0)

    for saved in (adapter, tmp_path / "final"):
        torch.testing.assert_close(score_texts(load_reward_model(saved), tok, TEXTS), expected, rtol=1e-5, atol=1e-5)
    assert main(["export", str(adapter), "--merge", "--out", str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(score_texts(load_reward_model(tmp_path / "exported"), tok, TEXTS), expected,
                               rtol=1e-5, atol=1e-5)

    # the adapter is not a language model's: loading it onto one names what to do instead
    with pytest.raises(ValueError, match="reward model's adapter .*optrush score"):
        load_adapter(build_model(get_preset("debug", vocab_size=len(tok)), seed=0), adapter)


def test_peft_loads_the_reward_adapter_onto_a_transformers_sequence_classifier(pairs_file, tokenizer_dir,
                                                                                 tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(tokenizer_dir)
    base = apply_reward_head(build_model(get_preset("debug", vocab_size=len(tok)), seed=0),
                             pad_token_id=tok.pad_token_id)
    save_model(base, tmp_path / "base")
    model, _ = trained_reward_lora(build_model(get_preset("debug", vocab_size=len(tok)), seed=0), tok, pairs_file,
                                   quantize="none")
    save_adapter(model, tmp_path / "adapter", base_model_path=tmp_path / "base")
    expected = torch.tensor(score_texts(model, tok, TEXTS))

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    rows = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False), tok.eos_token_id] for t in TEXTS]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
    with torch.no_grad():
        theirs = wrapped(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long()).logits[:, 0]
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


def test_lora_reward_run_trains_its_head_and_optrush_score_reads_the_adapter(pairs_file, debug_overrides, tmp_path,
                                                                             capsys):
    from optrush.cli.main import main
    from optrush.train import train

    train(load_config(None, [*debug_overrides, f"data.path={pairs_file}", "objective=reward",
                             "data.format=preference", "data.max_length=512", "train.max_steps=1",
                             "train.micro_batch_size=4", "peft.method=lora", "peft.r=4"]))
    run = tmp_path / "run"
    initial = load_file(run / "base" / "model.safetensors")["score.weight"]
    trained = load_file(run / "final" / "adapter" / ADAPTER_WEIGHTS)[HEAD_KEY]
    assert not torch.equal(initial, trained)
    torch.testing.assert_close(load_file(run / "final" / "model.safetensors")["score.weight"], trained)

    texts = tmp_path / "texts.jsonl"
    write_jsonl([{"text": t} for t in TEXTS], texts)
    scores = {}
    for saved in (run / "final" / "adapter", run / "final"):
        capsys.readouterr()
        assert main(["score", str(saved), "--data", str(texts)]) == 0
        scores[saved] = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    adapter_scores, merged_scores = scores.values()
    assert adapter_scores == pytest.approx(merged_scores, abs=1e-5) and len(adapter_scores) == 3
