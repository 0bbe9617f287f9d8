"""What a run refuses to write: a new run's checkpoints beside another run's, weights after a loss or grad norm
went inf/NaN; and the summary's losses, all over the steps' own losses."""
import json
import math
import shutil

import pytest

from conftest import forbid_reading_data
from optrush.config import ConfigError, load_config
from optrush.train import train
from optrush.train.loop import TrainingDiverged


def test_a_new_run_into_an_output_dir_with_checkpoints_is_refused_before_the_data_is_read(debug_overrides, tmp_path,
                                                                                            monkeypatch):
    base = debug_overrides + ["checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base + ["train.max_steps=4"]))
    checkpoints = tmp_path / "run" / "checkpoints"
    forbid_reading_data(monkeypatch)
    with pytest.raises(ConfigError, match=rf"output_dir={tmp_path / 'run'} already holds the checkpoints of a run "
                                          rf"\(the newest: {checkpoints / 'step_00000004'}, step 4\).*train into a "
                                          rf"new output_dir, or move or delete {checkpoints} to start over here"):
        train(load_config(None, base + ["train.max_steps=2", "checkpoint.resume=never"]))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]


def test_a_new_run_starts_once_the_checkpoints_are_moved_away(debug_overrides, tmp_path):
    base = debug_overrides + ["checkpoint.every=2", "checkpoint.save_final=false", "train.max_steps=2"]
    train(load_config(None, base))
    shutil.move(tmp_path / "run" / "checkpoints", tmp_path / "old")
    assert train(load_config(None, base))["steps"] == 2


def test_a_run_from_step_0_into_an_output_dir_with_a_final_model_is_refused_before_the_data_is_read(
        debug_overrides, tmp_path, monkeypatch):
    base = debug_overrides + ["train.max_steps=2", "checkpoint.every=0"]
    train(load_config(None, base))
    final = tmp_path / "run" / "final"
    saved = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    forbid_reading_data(monkeypatch)
    for resume in ("auto", "never"):
        with pytest.raises(ConfigError, match=rf"output_dir={tmp_path / 'run'} already holds a finished run's model "
                                              rf"\({final}\) and no checkpoint to resume.*move or delete {final}"):
            train(load_config(None, base + [f"checkpoint.resume={resume}"]))
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == saved


def test_a_nan_grad_norm_stops_the_run_and_no_final_is_written(debug_overrides, tmp_path):
    # a huge lr without clipping: the weights blow up, their gradients become NaN while the loss stays finite
    diverging = ["train.max_steps=4", "train.lr=1e5", "train.max_grad_norm=0", "train.warmup_steps=0",
                 "precision.mode=fp32"]
    with pytest.raises(TrainingDiverged, match=r"grad_norm became nan at step \d, so the run stops without saving "
                                               r"these weights: lower train.lr, keep gradient clipping on"):
        train(load_config(None, debug_overrides + diverging))
    assert not (tmp_path / "run" / "final").exists()


def test_a_nan_eval_loss_stops_the_run_and_no_final_is_written(debug_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr("optrush.train.loop.evaluate", lambda *args, **kwargs: {"eval_loss": math.nan})
    evaluated = ["train.max_steps=2", "data.eval_fraction=0.1", "train.eval_batches=1"]
    with pytest.raises(TrainingDiverged, match=r"eval_loss became nan at step 2"):
        train(load_config(None, debug_overrides + evaluated))
    assert not (tmp_path / "run" / "final").exists()


def test_final_and_min_loss_are_the_last_and_lowest_step_losses_on_resume_too(debug_overrides, tmp_path):
    base = debug_overrides + ["train.max_steps=4", "logging.every=2", "checkpoint.every=4",
                              "checkpoint.save_final=false"]
    summary = train(load_config(None, base))
    losses = summary["losses"]
    assert len(losses) == 4
    assert summary["final_loss"] == losses[-1] and summary["min_loss"] == min(losses)
    resumed = train(load_config(None, base + ["checkpoint.resume=auto"]))  # already complete: no step logged
    assert (resumed["final_loss"], resumed["min_loss"]) == (losses[-1], min(losses))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (written["final_loss"], written["min_loss"]) == (losses[-1], min(losses))
