"""What a user sees of a run: checkpoints usable like a final model, the logged lr, metrics.jsonl across fresh and
resumed runs, resume mistakes reported, and training-time samples on the console."""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from optrush.cli.main import main
from optrush.config import ConfigError, load_config
from optrush.config.schema import LoggingConfig, TrainConfig
from optrush.generate.load import load_for_generation
from optrush.optim.schedule import lr_at
from optrush.train import train
from optrush.train.checkpoint import STATE_FILE, checkpoint_model_dir
from optrush.train.metrics import MetricsLogger


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loss_steps(run: Path) -> list[int]:
    return [row["step"] for row in metric_rows(run) if "loss" in row]


def test_step_checkpoints_generate_and_average_like_final(debug_overrides, tmp_path, capsys):
    train(load_config(None, debug_overrides + ["train.max_steps=4", "checkpoint.every=2"]))
    run = tmp_path / "run"
    steps = [run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000004"]
    final_files = {f.name: f.read_bytes() for f in (run / "final").iterdir() if f.name.startswith(("tok", "chat"))}
    assert "tokenizer.json" in final_files
    for step in steps:  # the checkpoint's model folder carries the same tokenizer as final/
        assert {name: (step / "model" / name).read_bytes() for name in final_files} == final_files

    assert main(["generate", str(steps[0]), "--prompt", "Recipe:", "--max-new-tokens", "3"]) == 0
    assert main(["average", *map(str, steps), "--out", str(tmp_path / "avg")]) == 0
    assert (tmp_path / "avg" / "tokenizer.json").read_bytes() == final_files["tokenizer.json"]
    assert main(["generate", str(tmp_path / "avg"), "--prompt", "Recipe:", "--max-new-tokens", "3"]) == 0
    model, tokenizer = load_for_generation(steps[1])
    final, _ = load_for_generation(run / "final")  # the last checkpoint is the final model
    ids = torch.tensor([tokenizer.encode("Recipe: Soup")])
    torch.testing.assert_close(model(ids), final(ids))


def test_step_directory_without_an_hf_model_says_what_to_do(tmp_path):
    adapter_run, sharded_run = tmp_path / "step_00000002", tmp_path / "step_00000004"
    for step, inner in ((adapter_run, "adapter"), (sharded_run, "dcp")):
        (step / inner).mkdir(parents=True)
        (step / STATE_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="optrush export .* --merge"):
        checkpoint_model_dir(adapter_run)
    with pytest.raises(ConfigError, match="sharded checkpoint.*final/"):
        checkpoint_model_dir(sharded_run)
    assert checkpoint_model_dir(tmp_path) == tmp_path  # not a checkpoint: taken as is


def test_logged_lr_is_the_one_the_step_used_and_samples_are_printed(debug_overrides, tmp_path, capsys):
    overrides = ["train.max_steps=3", "train.warmup_steps=0", "train.lr=3e-3", "train.schedule=cosine",
                 "train.sample_every=2", "train.sample_prompts=['Recipe: Soup']", "train.sample_max_new_tokens=4",
                 "checkpoint.save_final=false"]
    train(load_config(None, debug_overrides + overrides))
    schedule = TrainConfig(max_steps=3, warmup_steps=0, schedule="cosine")
    lrs = [row["lr"] for row in metric_rows(tmp_path / "run") if "lr" in row]
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs == pytest.approx([3e-3 * lr_at(step, schedule) for step in range(3)])
    out = capsys.readouterr().out
    assert "step 2/3 | sample repetition" in out and "\n  sample 0: Recipe: Soup" in out


def test_samples_are_shown_after_their_prompt(tmp_path, capsys):
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(progress=False), total_steps=4,
                       sample_prompts=["Recipe: Soup"]) as logger:
        logger.log(2, {"sample_0": "\n- 1 cup water\n- salt\n\n", "sample_repetition": 0.25})
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["step 2/4 | sample repetition 0.25", "  sample 0: Recipe: Soup", "    - 1 cup water",
                         "    - salt"]


def test_fresh_run_starts_a_new_metrics_file_and_resume_keeps_each_step_once(debug_overrides, tmp_path):
    base = debug_overrides + ["train.max_steps=4", "checkpoint.every=2", "checkpoint.save_final=false"]
    run = tmp_path / "run"
    train(load_config(None, base))
    train(load_config(None, base + [f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}"]))
    assert loss_steps(run) == [1, 2, 3, 4]  # steps 3 and 4 of the first run were trained again: logged once
    shutil.rmtree(run / "checkpoints")  # a new run into this output_dir is refused while they are there
    train(load_config(None, base + ["train.max_steps=2", "checkpoint.resume=never"]))
    assert loss_steps(run) == [1, 2]


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(debug_overrides, tmp_path, capsys):
    """Back to step 2 of a run saved at 2, 4 and 6: steps 4 and 6 of the old history leave the checkpoint names,
    so `auto` after an interruption of the new run continues the new history (it took the old step 6), and
    pruning keeps the new run's checkpoints instead of the old ones."""
    base = debug_overrides + ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=2",
                              "checkpoint.save_final=false", "train.deterministic=true"]
    checkpoints = tmp_path / "run" / "checkpoints"
    train(load_config(None, base + ["checkpoint.keep_last=3"]))
    old_6 = torch.load(checkpoints / "step_00000006" / STATE_FILE, weights_only=False)["train"]
    capsys.readouterr()
    train(load_config(None, base + ["train.max_steps=4", f"checkpoint.resume={checkpoints / 'step_00000002'}"]))
    assert f"moved the checkpoints past step 2 to {checkpoints / 'abandoned_after_step_00000002'}" in \
        capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["abandoned_after_step_00000002", "step_00000002",
                                                             "step_00000004"]
    assert sorted(p.name for p in (checkpoints / "abandoned_after_step_00000002").iterdir()) == [
        "step_00000004", "step_00000006"]
    train(load_config(None, base + ["checkpoint.resume=auto"]))  # the new history's step 4, not the old step 6
    assert "resumed from" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["abandoned_after_step_00000002", "step_00000004",
                                                             "step_00000006"]
    new_6 = torch.load(checkpoints / "step_00000006" / STATE_FILE, weights_only=False)["train"]
    assert new_6["step"] == old_6["step"] == 6


def test_metrics_file_on_resume_keeps_rows_up_to_the_resumed_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                                            + '{"step": 4, "lo')  # the interrupted run died mid-row
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=4, start_step=2) as logger:
        logger.log(3, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in metric_rows(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_tensorboard_hides_steps_a_resume_trains_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(tensorboard=True)
    for start, losses in ((0, {1: 9.0, 2: 9.0, 3: 9.0}), (0, {1: 5.0, 2: 5.0}), (1, {2: 1.0})):
        with MetricsLogger(output_dir=tmp_path, cfg=cfg, total_steps=3, start_step=start) as logger:
            for step, loss in losses.items():
                logger.log(step, {"loss": loss})
        time.sleep(1.1)  # event files are named (and read) by their second
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 5.0), (2, 1.0)]


def test_resume_reports_a_finished_run_a_passed_max_steps_and_changed_settings(debug_overrides, tmp_path, capsys):
    base = debug_overrides + ["train.max_steps=4", "checkpoint.every=4", "checkpoint.save_final=false"]
    train(load_config(None, base))
    resume = base + ["checkpoint.resume=auto"]
    with pytest.raises(ConfigError, match=r"at step 4, past train.max_steps=3: set train.max_steps above 4"):
        train(load_config(None, resume + ["train.max_steps=3"]))
    capsys.readouterr()

    summary = train(load_config(None, resume))
    assert summary["steps"] == 4
    assert "the run is already complete (train.max_steps=4): nothing left to train" in capsys.readouterr().out

    summary = train(load_config(None, resume + ["train.max_steps=5", "train.grad_accum=2", "train.lr=1.0"]))
    assert summary["steps"] == 5
    err = capsys.readouterr().err
    assert "train.max_steps: 4 -> 5 (the learning-rate schedule changes" in err
    assert "train.grad_accum: 1 -> 2 (the global batch changes from 2 to 4 rows per step)" in err
    assert "train.lr: 0.01 -> 1.0 (not applied: the resumed run keeps the checkpoint's peak lr)" in err
    assert "train.micro_batch_size" not in err
    assert max(row["lr"] for row in metric_rows(tmp_path / "run") if "lr" in row) <= 1e-2  # indeed not applied


def test_resume_with_another_micro_batch_size_names_the_key(debug_overrides, tmp_path):
    base = debug_overrides + ["train.max_steps=4", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base + ["train.max_steps=2"]))
    with pytest.raises(ConfigError, match=r"train.micro_batch_size differs from the checkpoint's \(2 -> 1;"):
        train(load_config(None, base + ["checkpoint.resume=auto", "train.micro_batch_size=1", "train.grad_accum=2"]))


def test_train_sets_tf32_and_determinism_for_the_run_only(debug_overrides, monkeypatch):
    from optrush.train import loop

    def flags():
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled())

    before, seen, real_run = flags(), [], loop.run
    monkeypatch.setattr(loop, "run", lambda cfg, parallel: seen.append(flags()) or real_run(cfg, parallel))
    train(load_config(None, debug_overrides + ["train.max_steps=1", "precision.tf32=true", "train.deterministic=true"]))
    assert seen == [(True, True, True)] and flags() == before  # a caller's fp32 work afterwards runs as before


def test_resume_warns_that_changed_optimizer_hyperparameters_are_not_applied(debug_overrides, tmp_path, capsys):
    base = debug_overrides + ["train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base))
    capsys.readouterr()
    changed = ["optim.betas=[0.5,0.6]", "optim.eps=1e-2", "optim.weight_decay=0.1"]
    unused = ["peft.r=8", "optim.momentum=0.5"]  # settings of another peft method and optimizer: no effect here
    train(load_config(None, base + ["checkpoint.resume=auto", "train.max_steps=4"] + changed + unused))
    err = capsys.readouterr().err
    assert "peft.r" not in err and "optim.momentum" not in err
    effect = "(not applied: the resumed optimizer keeps the checkpoint's value)"
    for change in ("optim.betas: [0.9, 0.95] -> [0.5, 0.6]", "optim.eps: 1e-08 -> 0.01",
                   "optim.weight_decay: 0.0 -> 0.1"):
        assert f"{change} {effect}" in err
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004" / STATE_FILE, weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # indeed not applied
    # and the resumed run's checkpoint records the values in effect, so resuming it again with them still warns
    assert saved["train"]["settings"]["optim.betas"] == [0.9, 0.95]


@pytest.mark.parametrize("change, message", [
    ("optim.name=lion", r"optim.name differs from the checkpoint's \(adamw -> lion\)"),
    ("optim.name=adafactor", r"optim.name differs from the checkpoint's \(adamw -> adafactor\)"),
    ("peft.method=lora", r"peft.method differs from the checkpoint's \(none -> lora\)"),
    ("model.preset=demo", r"model.preset differs from the checkpoint's \(debug -> demo\)"),
])
def test_resume_refuses_another_optimizer_model_or_adapters_before_loading(debug_overrides, tmp_path, change, message):
    base = debug_overrides + ["train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base))
    with pytest.raises(ConfigError, match=message + r".*: resume with the same setting, or start a new run in a "
                                                    r"new output_dir \(checkpoint.resume=never\)"):
        train(load_config(None, base + ["checkpoint.resume=auto", "train.max_steps=3", change]))


def test_resume_of_a_checkpoint_that_did_not_save_a_setting_skips_its_comparison(debug_overrides, tmp_path, capsys):
    base = debug_overrides + ["train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base))
    state_file = tmp_path / "run" / "checkpoints" / "step_00000002" / STATE_FILE
    saved = torch.load(state_file, weights_only=False)
    for key in ("optim.name", "optim.betas", "trainable parameters"):  # as written before they were recorded
        del saved["train"]["settings"][key]
    torch.save(saved, state_file)
    capsys.readouterr()
    summary = train(load_config(None, base + ["checkpoint.resume=auto", "train.max_steps=3", "optim.betas=[0.5,0.6]"]))
    assert summary["steps"] == 3 and "optim.betas" not in capsys.readouterr().err


def test_resume_from_a_final_directory_says_it_is_no_checkpoint(debug_overrides, tmp_path):
    base = debug_overrides + ["train.max_steps=1"]
    train(load_config(None, base))
    final = tmp_path / "run" / "final"
    with pytest.raises(ConfigError, match=rf"{final} is not a resumable training checkpoint .*checkpoints/step_N.*"
                                          rf"model.path={final} and checkpoint.resume=never in a new output_dir"):
        train(load_config(None, base + [f"checkpoint.resume={final}"]))


def test_eval_ppl_is_logged_for_language_modelling_only(recipe_corpus, debug_overrides, tmp_path):
    from optrush.data.preference import recipe_preference_pairs
    from optrush.data.recipes import write_jsonl

    evaluated = ["train.max_steps=1", "data.eval_fraction=0.1", "train.eval_batches=1", "checkpoint.save_final=false"]
    assert "eval_ppl" in train(load_config(None, debug_overrides + evaluated))
    pairs = tmp_path / "pairs.jsonl"
    short = [{**r, "ingredients": r["ingredients"][:3], "directions": r["directions"][:3]}
             for r in recipe_corpus[1][:60]]  # pairs that fit data.max_length
    write_jsonl(recipe_preference_pairs(short, seed=0), pairs)
    summary = train(load_config(None, debug_overrides + evaluated + [
        f"data.path={pairs}", "objective=reward", "data.format=preference", "data.max_length=512"]))
    assert "eval_loss" in summary and "eval_accuracy" in summary and "eval_ppl" not in summary
    assert not any("eval_ppl" in row for row in metric_rows(tmp_path / "run"))


def test_ctrl_c_during_train_prints_one_line_naming_the_last_checkpoint(debug_overrides, tmp_path, monkeypatch,
                                                                        capsys):
    from optrush.train import loop

    real_accumulate = loop.accumulate_gradients
    calls = []

    def interrupted_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", interrupted_at_step_3)
    monkeypatch.delenv("OPTRUSH_TRACEBACK", raising=False)  # which asks for the stack instead
    assert main(["train", *debug_overrides, "train.max_steps=4", "checkpoint.every=2"]) == 130
    err = capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert err == (f"optrush: interrupted after step 2; the last checkpoint is {checkpoint} "
                   "(resume with checkpoint.resume=auto)\n")

    monkeypatch.setattr(loop, "build", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    # before the loop: no step to name (another output_dir: a new run beside the checkpoints above is refused)
    assert main(["train", *debug_overrides, f"output_dir={tmp_path / 'other'}"]) == 130
    assert capsys.readouterr().err == "optrush: interrupted\n"


def test_resume_of_a_lora_run_refuses_another_rank_and_keeps_the_lora_plus_ratio(debug_overrides, tmp_path, capsys):
    base = debug_overrides + ["train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false",
                              "peft.method=lora", "peft.r=4"]
    train(load_config(None, base))
    resume = base + ["checkpoint.resume=auto", "train.max_steps=3"]
    with pytest.raises(ConfigError, match=r"peft.r differs from the checkpoint's \(4 -> 8\)"):
        train(load_config(None, resume + ["peft.r=8"]))
    capsys.readouterr()
    train(load_config(None, resume + ["peft.lora_plus_ratio=16"]))
    assert ("peft.lora_plus_ratio: 1.0 -> 16.0 (not applied: the resumed optimizer keeps the checkpoint's value)"
            in capsys.readouterr().err)


def test_a_longer_schedule_applies_from_the_first_resumed_step(debug_overrides, tmp_path):
    base = debug_overrides + ["train.schedule=cosine", "train.warmup_steps=0", "logging.every=1",
                              "checkpoint.save_final=false"]
    train(load_config(None, base + ["train.max_steps=4", "checkpoint.every=4"]))
    train(load_config(None, base + ["train.max_steps=6", "checkpoint.resume=auto"]))
    resumed = {row["step"]: row["lr"] for row in metric_rows(tmp_path / "run") if "lr" in row}
    fresh = [lr_at(step, load_config(None, base + ["train.max_steps=6"]).train) * 1e-2 for step in (4, 5)]
    assert [resumed[5], resumed[6]] == pytest.approx(fresh)


def test_a_resume_that_keeps_the_global_batch_says_so():
    from optrush.train.resume import describe_changes

    saved = {"train.micro_batch_size": 2, "train.grad_accum": 2, "data-parallel replicas": 2}
    current = {"train.micro_batch_size": 2, "train.grad_accum": 1, "data-parallel replicas": 4}
    assert describe_changes(saved, current).splitlines() == [
        "  train.grad_accum: 2 -> 1 (the global batch stays 8 rows per step)",
        "  data-parallel replicas: 2 -> 4 (the global batch stays 8 rows per step)"]
