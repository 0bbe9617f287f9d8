"""`optrush eval` on preference pairs: a reward model and a DPO policy get training's own eval metrics (the DPO
reference found from the run's summary.json or given with --reference; the policy's log-prob accuracy when no
reference exists), and the options it names are ones it takes. On single-example data the sample metrics fit the
format: recipe metrics for recipes only, format=text samples continue the start of a document, and --samples 0
leaves the sample rows out."""
import json

import pytest

from optrush.cli.main import main
from optrush.config import load_config
from optrush.data.preference import recipe_preference_pairs
from optrush.data.recipes import write_jsonl
from optrush.train import train

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def pair_files(recipe_corpus, tmp_path_factory):
    """(train pairs, held-out pairs) of recipes cut short (two ingredients, two steps): several pairs a row."""
    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:30]]
    folder = tmp_path_factory.mktemp("eval_pairs")
    train_path, heldout_path = folder / "pairs.jsonl", folder / "heldout.jsonl"
    pairs = recipe_preference_pairs(records, seed=0)
    write_jsonl(pairs[:20], train_path)
    write_jsonl(pairs[20:], heldout_path)
    return train_path, heldout_path


@pytest.fixture(scope="module")
def pair_run(pair_files, tokenizer_dir, tmp_path_factory):
    """Train a 2-step pairwise run (held-out pairs evaluated at its end); returns its output directory."""
    def run(objective: str, *extra: str):
        output_dir = tmp_path_factory.mktemp(objective)
        train(load_config(None, [
            f"objective={objective}", "model.preset=debug", f"data.path={pair_files[0]}",
            f"data.eval_path={pair_files[1]}", "data.format=preference", f"data.tokenizer={tokenizer_dir}",
            "data.max_length=256", "train.micro_batch_size=2", "train.max_steps=2", "train.lr=1e-2",
            "train.device=cpu", "precision.mode=fp32", "logging.progress=false", "checkpoint.resume=never",
            f"output_dir={output_dir}", *extra]))
        return output_dir

    return run


@pytest.fixture(scope="module")
def reward_run(pair_run):
    return pair_run("reward")


@pytest.fixture(scope="module")
def preset_dpo_run(pair_run):
    return pair_run("dpo")


def eval_report(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "report.md"
    assert main(["eval", *args, *CPU, "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def training_eval(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_reward_model_eval_gives_its_training_eval_metrics(reward_run, pair_files, tmp_path):
    report, markdown = eval_report(tmp_path, str(reward_run / "final"), "--data", str(pair_files[1]),
                                   "--format", "preference")
    trained = training_eval(reward_run)
    assert report["model"] == "reward" and report["pairs"] == 10
    assert report["accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1e-6)
    assert report["reward_gap"] == pytest.approx(trained["eval_reward_gap"], rel=1e-4)
    assert report["loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    assert "| ranking accuracy (score(chosen) > score(rejected)) |" in markdown


def test_dpo_eval_gives_its_training_eval_metrics_against_the_recorded_reference(pair_run, pair_files,
                                                                                 tiny_checkpoint, tmp_path):
    start = tiny_checkpoint[0]  # the run's model.path: its reference
    run = pair_run("dpo", "model.preset=null", f"model.path={start}", "dpo.beta=0.2")
    report, markdown = eval_report(tmp_path, str(run / "final"), "--data", str(pair_files[1]), "--format",
                                   "preference")
    trained = training_eval(run)
    assert report["reference"] == str(start) and report["dpo"]["beta"] == 0.2  # the run's own settings
    for name in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert report[name] == pytest.approx(trained[f"eval_{name}"], rel=1e-4, abs=1e-6), name
    assert "| DPO loss (dpo.loss=sigmoid, dpo.beta=0.2) |" in markdown and "log-prob preference accuracy" in markdown
    # a dpo.* override changes how the pairs are scored
    beta_one, _ = eval_report(tmp_path, str(run / "final"), "--data", str(pair_files[1]), "--format", "preference",
                              "dpo.beta=1.0")
    assert beta_one["reward_margin"] == pytest.approx(5 * report["reward_margin"], rel=1e-4)


def test_dpo_eval_of_a_preset_run_reports_what_it_can_and_how_to_get_the_rest(preset_dpo_run, pair_files,
                                                                              tiny_checkpoint, tmp_path):
    final = str(preset_dpo_run / "final")
    report, markdown = eval_report(tmp_path, final, "--data", str(pair_files[1]), "--format", "preference")
    assert report["model"] == "policy" and 0 <= report["logp_accuracy"] <= 1 and "loss" not in report
    assert report["reference"] is None and "random model.preset=debug init" in report["reference_note"]
    assert "No DPO metrics:" in markdown and "--reference DIR" in markdown
    # the option the note names is one eval takes
    given, _ = eval_report(tmp_path, final, "--data", str(pair_files[1]), "--format", "preference",
                           "--reference", str(tiny_checkpoint[0]))
    assert given["reference"] == str(tiny_checkpoint[0]) and given["reference_note"] == "given with --reference"
    assert given["loss"] > 0 and given["logp_accuracy"] == report["logp_accuracy"]


def test_eval_refuses_what_its_format_does_not_use(reward_run, pair_files, recipe_corpus, tiny_checkpoint, capsys):
    pairs, recipes, ckpt = str(pair_files[1]), str(recipe_corpus[0]), str(tiny_checkpoint[0])
    assert main(["eval", ckpt, "--data", pairs, "--format", "preference", "--samples", "2", *CPU]) == 2
    assert "preference data is scored pair by pair and draws no samples" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", recipes, "dpo.beta=0.5", *CPU]) == 2
    assert "dpo.beta scores preference pairs; it applies with --format preference only" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", recipes, "--reference", ckpt, *CPU]) == 2
    assert "only --format preference uses a reference model" in capsys.readouterr().err
    assert main(["eval", str(reward_run / "final"), "--data", recipes, *CPU]) == 2
    assert "is a reward model" in capsys.readouterr().err  # with the advice: --format preference (tested above)


def test_text_samples_continue_the_start_of_a_document_without_recipe_metrics(tiny_checkpoint, recipe_corpus,
                                                                              tmp_path):
    from optrush.data.recipes import recipe_completion, recipe_prompt

    texts = tmp_path / "texts.jsonl"
    documents = [recipe_prompt(r) + recipe_completion(r) for r in recipe_corpus[1][:2]]
    write_jsonl([{"text": document} for document in documents], texts)
    report, markdown = eval_report(tmp_path, str(tiny_checkpoint[0]), "--data", str(texts), "--format", "text",
                                   "--samples", "2", "--max-new-tokens", "4", "--max-length", "128")
    for sample, document in zip(report["samples"], documents):
        assert sample["prompt"] and document.startswith(sample["prompt"]) and len(sample["prompt"]) < len(document)
        assert set(sample) == {"prompt", "text", "repetition"}
    assert "mean_parses" not in report and "mean_repetition" in report
    assert "parsing as recipes" not in markdown and "ingredients used" not in markdown and "parses:" not in markdown
    assert "Each sample continues the first 32 tokens (at most half) of a document." in markdown


def test_no_samples_no_sample_rows(tiny_checkpoint, recipe_corpus, tmp_path):
    recipes = tmp_path / "recipes.jsonl"
    write_jsonl(recipe_corpus[1][:4], recipes)
    report, markdown = eval_report(tmp_path, str(tiny_checkpoint[0]), "--data", str(recipes), "--samples", "0",
                                   "--max-length", "128")
    assert report["samples"] == [] and not any(key.startswith("mean_") for key in report)
    assert "nan" not in markdown and "repeated word" not in markdown and "| perplexity |" in markdown
