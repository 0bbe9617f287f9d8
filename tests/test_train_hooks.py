"""What the loop does beside the step: EMA weights, extra checkpointed state (GRPO rollouts, EMA), samples logged
during training, the planner's advice on an out-of-memory error."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import optrush.train.loop as loop
from optrush.config import load_config
from optrush.train import train


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def resumed_equals_straight(overrides: list[str], tmp_path: Path, *, at: int = 2) -> tuple[dict, dict]:
    """Train 4 steps straight (checkpoint every step), and again from its step-`at` checkpoint; return both
    summaries."""
    base = [o for o in overrides if not o.startswith(("output_dir", "train.max_steps", "checkpoint.resume"))]
    base += ["checkpoint.every=1", "checkpoint.keep_last=4", "train.deterministic=true", "train.max_steps=4"]
    straight = train(load_config(None, base + [f"output_dir={tmp_path / 'a'}", "checkpoint.resume=never"]))
    resumed = train(load_config(None, base + [f"output_dir={tmp_path / 'b'}",
                                             f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / f'step_{at:08d}'}"]))
    return straight, resumed


def test_ema_weights_are_saved_and_resume_exactly(debug_overrides, tmp_path):
    ema = debug_overrides + ["train.ema_decay=0.5"]
    straight, resumed = resumed_equals_straight(ema, tmp_path)
    assert straight["losses"] == resumed["losses"]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # final/ holds the EMA weights: differs from a plain run with the same losses
    plain = train(load_config(None, debug_overrides + ["train.max_steps=4", "train.deterministic=true",
                                                       f"output_dir={tmp_path / 'plain'}"]))
    assert plain["losses"] == straight["losses"]
    p = final_weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], p[k]) for k in a)
    with pytest.raises(Exception, match="holds no ema state"):  # a checkpoint without EMA, resumed with it
        train(load_config(None, debug_overrides + ["train.max_steps=4", "checkpoint.every=2",
                                                   f"output_dir={tmp_path / 'c'}"]))
        train(load_config(None, ema + ["train.max_steps=6", f"output_dir={tmp_path / 'c'}",
                                       "checkpoint.resume=auto"]))


def test_grpo_reused_rollouts_resume_exactly_through_train(debug_overrides, tmp_path):
    grpo = debug_overrides + ["objective=grpo", "data.packing=none", "grpo.group_size=2", "grpo.max_new_tokens=4",
                              "grpo.updates_per_generation=2", "train.micro_batch_size=1", "data.format=recipe",
                              "grpo.rewards=[test_objectives_grpo:vowel_share]"]  # varies, so advantages are non-zero
    # the step-1 checkpoint lands between a generation and its reuse: the stored rollouts must come back
    straight, resumed = resumed_equals_straight(grpo, tmp_path, at=1)
    assert straight["losses"] == resumed["losses"] and any(loss != 0 for loss in straight["losses"])


def test_samples_during_training_are_logged(debug_overrides, tmp_path):
    cfg = load_config(None, debug_overrides + ["train.max_steps=2", "train.sample_every=2",
                                               "train.sample_prompts=['Recipe: Soup']",
                                               "train.sample_max_new_tokens=4", "checkpoint.save_final=false"])
    train(cfg)
    logged = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    samples = [row for row in logged if "sample_0" in row]
    assert len(samples) == 1 and samples[0]["step"] == 2 and isinstance(samples[0]["sample_0"], str)


def test_out_of_memory_prints_the_planners_advice(debug_overrides, monkeypatch, capsys):
    def out_of_memory(cfg, parallel):
        raise torch.OutOfMemoryError("CUDA out of memory (planted)")

    monkeypatch.setattr(loop, "run", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train(load_config(None, debug_overrides))
    advice = capsys.readouterr().err
    assert advice.strip(), "the planner's advice must be printed"
