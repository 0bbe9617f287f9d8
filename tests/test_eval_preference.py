"""`optrush eval --format preference` finds a DPO run's reference wherever it runs (the summary records the
starting model's absolute path) and, for a QLoRA run, loads it quantized as training did; every command decides
"reward adapter" by one rule, the saved head: a SEQ_CLS adapter without it is refused with what to do, and one
that holds it is a reward model whatever its task type says."""
import json
import shutil

import pytest

from optrush.cli.main import main
from optrush.config import load_config
from optrush.config.schema import PeftConfig
from optrush.data.preference import recipe_preference_pairs
from optrush.data.recipes import write_jsonl
from optrush.generate.load import load_for_generation
from optrush.models.io import load_model
from optrush.objectives.reward import apply_reward_head, load_reward_model
from optrush.peft import apply_lora, save_adapter
from optrush.peft.export import ADAPTER_CONFIG, is_reward_adapter
from optrush.train import train

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def pairs(recipe_corpus, tmp_path_factory):
    """(train pairs, held-out pairs) of recipes cut short (two ingredients, two steps)."""
    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:24]]
    folder = tmp_path_factory.mktemp("pref_pairs")
    made = recipe_preference_pairs(records, seed=0)
    write_jsonl(made[:16], folder / "pairs.jsonl")
    write_jsonl(made[16:], folder / "heldout.jsonl")
    return folder / "pairs.jsonl", folder / "heldout.jsonl"


def eval_pairs(final, heldout, out_dir) -> dict:
    out = out_dir / "report.md"
    assert main(["eval", str(final), "--data", str(heldout), "--format", "preference", *CPU, "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_dpo_eval_from_another_directory_finds_a_relative_model_path(pairs, tokenizer_dir, tiny_checkpoint,
                                                                     tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint[0], project / "start")
    elsewhere.mkdir()
    monkeypatch.chdir(project)  # training names its starting model and output_dir relative to here
    train(load_config(None, [
        "objective=dpo", "model.path=start", f"data.path={pairs[0]}", "data.format=preference",
        f"data.tokenizer={tokenizer_dir}", "data.max_length=256", "train.micro_batch_size=2", "train.max_steps=1",
        "train.device=cpu", "precision.mode=fp32", "logging.progress=false", "checkpoint.resume=never",
        "output_dir=runs/dpo"]))
    run = project / "runs" / "dpo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["model"]["path"] == "start"
    assert summary["starting_model"] == str((project / "start").resolve())

    monkeypatch.chdir(elsewhere)
    report = eval_pairs(run / "final", pairs[1], tmp_path)
    assert report["reference"] == summary["starting_model"] and "loss" in report
    assert "starting_model in" in report["reference_note"]

    # a summary.json of an older optrush holds only the relative model.path: taken from the current directory
    summary_start = summary.pop("starting_model")
    (run / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(project)
    older = eval_pairs(run / "final", pairs[1], tmp_path)
    assert older["reference"] == summary_start and older["loss"] == pytest.approx(report["loss"])
    assert "model.path=start" in older["reference_note"]

    # gone: the note names the path it tried
    shutil.rmtree(project / "start")
    missing = eval_pairs(run / "final", pairs[1], tmp_path)
    assert missing["reference"] is None and "loss" not in missing
    assert f"tried {summary_start} (model.path=start" in missing["reference_note"]


@pytest.fixture
def lora_adapters(tiny_checkpoint, tmp_path):
    """(a language model's LoRA adapter, a reward model's LoRA adapter with its head), both over the tiny
    checkpoint, each beside a copy of its tokenizer as in a run's final/."""
    base = tiny_checkpoint[0]
    made = []
    for name, reward in (("lm", False), ("rm", True)):
        model = load_model(base)
        if reward:
            apply_reward_head(model, pad_token_id=tiny_checkpoint[2].pad_token_id)
        apply_lora(model, PeftConfig(method="lora", r=2, alpha=4))
        made.append(save_adapter(model, tmp_path / name / "adapter", base_model_path=base))
        tiny_checkpoint[2].save_pretrained(tmp_path / name)
    return tuple(made)


def set_task_type(adapter, task_type: str) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "task_type": task_type}))


def test_a_seq_cls_adapter_without_the_saved_head_is_refused_everywhere_with_what_to_do(lora_adapters, pairs,
                                                                                       tmp_path, capsys):
    adapter = lora_adapters[0]
    set_task_type(adapter, "SEQ_CLS")  # a language model's adapter labelled as a classifier's: no head in it
    with pytest.raises(ValueError, match="task_type SEQ_CLS .* no 'score' head") as refusal:
        is_reward_adapter(adapter)
    assert str(adapter) in str(refusal.value) and "set task_type to CAUSAL_LM" in str(refusal.value)
    for loading in (lambda: load_for_generation(adapter=adapter), lambda: load_reward_model(adapter)):
        with pytest.raises(ValueError, match="task_type SEQ_CLS"):
            loading()
    texts = tmp_path / "texts.jsonl"
    write_jsonl([{"text": "Recipe: Toast"}], texts)
    commands = (["eval", str(adapter), "--data", str(pairs[1]), "--format", "preference", *CPU],
                ["eval", str(adapter), "--data", str(pairs[1]), "--format", "text", *CPU],
                ["score", str(adapter), "--data", str(texts)])
    for command in commands:
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{adapter}: adapter_config.json says task_type SEQ_CLS" in err and "train the reward model again" in err


def test_an_adapter_holding_the_reward_head_is_a_reward_model_whatever_its_task_type(lora_adapters, pairs, tmp_path):
    adapter = lora_adapters[1]
    set_task_type(adapter, "CAUSAL_LM")  # the head is saved (modules_to_save score): that decides
    assert is_reward_adapter(adapter)
    report = eval_pairs(adapter, pairs[1], tmp_path)
    assert report["model"] == "reward" and 0 <= report["accuracy"] <= 1
    assert load_reward_model(adapter).output.weight.shape[0] == 1


@pytest.mark.parametrize("quantize,reference", [("nf4", "copy"), ("int8", "lora_disabled")])
def test_qlora_dpo_eval_gives_training_eval_loss_against_the_quantized_base(quantize, reference, pairs,
                                                                            tokenizer_dir, tiny_checkpoint, tmp_path):
    """Training's reference was the quantized base (a frozen copy, or the policy with its adapters off): eval loads
    the adapter's base quantized the same way as the reference, for the adapter and for the merged final/."""
    run = tmp_path / "run"
    train(load_config(None, [
        "objective=dpo", f"model.path={tiny_checkpoint[0]}", f"data.path={pairs[0]}", f"data.eval_path={pairs[1]}",
        "data.format=preference", f"data.tokenizer={tokenizer_dir}", "data.max_length=256",
        "train.micro_batch_size=2", "train.max_steps=2", "train.lr=1e-2", "train.eval_batches=100",
        "train.device=cpu", "precision.mode=fp32", "logging.progress=false", "checkpoint.resume=never",
        "peft.method=lora", "peft.r=4", f"peft.quantize={quantize}", f"dpo.reference={reference}",
        f"output_dir={run}"]))
    trained = json.loads((run / "summary.json").read_text())
    for checkpoint in (run / "final" / "adapter", run / "final"):  # the adapter, the merged model
        report = eval_pairs(checkpoint, pairs[1], tmp_path)
        assert report["reference"] == str(tiny_checkpoint[0].resolve())
        for name in ("loss", "reward_margin", "chosen_reward", "rejected_reward"):  # tight: int8 is close to fp32
            assert report[name] == pytest.approx(trained[f"eval_{name}"], rel=1e-5, abs=1e-6), (checkpoint, name)
        assert f"loaded {quantize}-quantized" in report["reference_note"]
    # another directory given with --reference loads as it is
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint[0], other)
    out = tmp_path / "other.md"
    assert main(["eval", str(run / "final" / "adapter"), "--data", str(pairs[1]), "--format", "preference", *CPU,
                 "--reference", str(other), "--out", str(out)]) == 0
    given = json.loads(out.with_suffix(".json").read_text())
    assert given["reference_note"] == "given with --reference"
    assert given["chosen_reward"] != pytest.approx(report["chosen_reward"], rel=1e-5, abs=1e-6)
