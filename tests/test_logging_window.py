"""What a log line holds with logging.every > 1: every number of it covers the same steps (means of loss, grad norm
and the objective's metrics, the sum of the trained units), under a name that says what it counts; the console's
eval line shows the objective's eval metrics under their metrics.jsonl names; LoRA runs report their trainable
parameters."""
import json

import pytest

from optrush.config import load_config
from optrush.config.schema import LoggingConfig
from optrush.train import train
from optrush.train.metrics import MetricsLogger


def rows(run_dir, key: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if key in row]


def dpo_overrides(debug_overrides, short_pairs_file) -> list[str]:
    return [*debug_overrides, f"data.path={short_pairs_file}", "objective=dpo", "data.format=preference",
            "data.max_length=256", "train.lr=1e-3", "dpo.reference=precomputed", "data.eval_fraction=0.2",
            "train.eval_batches=2"]


def test_a_logged_loss_and_grad_norm_are_means_over_the_steps_of_the_line(debug_overrides, tmp_path):
    runs = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}"
        train(load_config(None, debug_overrides + ["train.max_steps=4", f"logging.every={every}",
                                                   f"output_dir={out}"]))
        runs[every] = rows(out, "loss")
    steps = runs[1]
    assert [row["step"] for row in runs[2]] == [2, 4]
    for row, pair in zip(runs[2], (steps[0:2], steps[2:4])):
        assert row["loss"] == pytest.approx(sum(s["loss"] for s in pair) / 2, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(sum(s["grad_norm"] for s in pair) / 2, rel=1e-5)
        assert row["trained_tokens"] == sum(s["trained_tokens"] for s in pair)
        assert row["lr"] == pair[1]["lr"]  # the last step's


def test_pairwise_lines_count_pairs_and_eval_lines_show_the_objective_metrics(debug_overrides, short_pairs_file,
                                                                              tmp_path, capsys):
    train(load_config(None, dpo_overrides(debug_overrides, short_pairs_file) + ["train.max_steps=2", "train.eval_every=2"]))
    logged = rows(tmp_path / "run", "loss")
    assert all(isinstance(row["trained_pairs"], int) and row["trained_pairs"] > 0 for row in logged)
    assert not any("trained_tokens" in row for row in logged)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    evals = [line for line in lines if "eval_loss" in line]
    assert evals and all(" | eval_accuracy " in line and " | eval_reward_margin " in line for line in evals)
    assert all(" | accuracy " in line and " | reward_margin " in line for line in lines if line not in evals)


def test_an_evaluation_never_averages_in_training_steps(debug_overrides, short_pairs_file, tmp_path):
    """logging.every=3 with eval_every=2: the training steps not yet logged at step 2 are logged there, before the
    evaluation, so its metrics are those of the evaluation batches alone (as with logging.every=1)."""
    for every in (1, 3):
        train(load_config(None, dpo_overrides(debug_overrides, short_pairs_file) + [
            "train.max_steps=3", "train.eval_every=2", f"logging.every={every}",
            f"output_dir={tmp_path / str(every)}"]))
    evals = {every: rows(tmp_path / str(every), "eval_loss") for every in (1, 3)}
    assert len(evals[3]) == len(evals[1]) == 2
    for mixed, alone in zip(evals[3], evals[1]):
        del mixed["elapsed_s"], alone["elapsed_s"]
        assert mixed == pytest.approx(alone, rel=1e-6)
    assert [row["step"] for row in rows(tmp_path / "3", "loss")] == [2, 3]


def test_grpo_eval_line_shows_reward_and_kl(tmp_path, capsys):
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=2) as logger:
        logger.log(2, {"eval_loss": 0.0, "eval_reward": 0.25, "eval_kl": 0.001, "eval_completion_tokens": 15.0})
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")][0]
    assert line == "step 2/2 | eval_loss 0.0000 | eval_reward 0.250 | eval_kl 0.0010"


def test_lora_run_reports_its_trainable_parameters(debug_overrides, tmp_path, capsys):
    summary = train(load_config(None, debug_overrides + ["train.max_steps=1", "peft.method=lora", "peft.r=4"]))
    assert 0 < summary["trainable_params"] < summary["params"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["trainable_params"] == summary["trainable_params"]
    share = 100 * summary["trainable_params"] / summary["params"]
    assert (f"params: {summary['trainable_params']:,} trainable of {summary['params']:,} ({share:.3g}%)"
            in capsys.readouterr().out)


def test_checkpoints_and_the_final_model_are_announced(debug_overrides, tmp_path, capsys):
    """Saving printed nothing: a user could not tell when a checkpoint to resume from existed, nor where."""
    out = tmp_path / "run"
    train(load_config(None, [*debug_overrides, f"output_dir={out}", "train.max_steps=4", "checkpoint.every=2"]))
    lines = capsys.readouterr().out.splitlines()
    for step in (2, 4):
        assert f"step {step}: checkpoint saved to {out / 'checkpoints' / f'step_{step:08d}'}" in lines
    assert f"final model saved to {out / 'final'}" in lines
