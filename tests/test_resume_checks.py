"""Resuming with settings that differ from the checkpoint's: those the saved data position or optimizer state
depend on are refused at start-up, before any data is read; those applied from the resumed step on are reported."""
import pytest

from conftest import lift_float8_device_check
from optrush.config import ConfigError, load_config
from optrush.train import train


@pytest.fixture(scope="module")
def checkpointed_run(recipe_corpus, tokenizer_dir, tmp_path_factory):
    """Overrides of a 2-step debug run that saved a checkpoint at step 2, resumed by checkpoint.resume=auto."""
    out = tmp_path_factory.mktemp("resume") / "run"
    base = [f"data.path={recipe_corpus[0]}", f"data.tokenizer={tokenizer_dir}", f"output_dir={out}",
            "model.preset=debug", "objective=sft", "data.format=recipe", "data.max_length=256",
            "train.micro_batch_size=2", "train.lr=1e-2", "train.device=cpu", "logging.progress=false",
            "train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, base + ["checkpoint.resume=never"]))
    return base + ["checkpoint.resume=auto", "train.max_steps=3"]


@pytest.mark.parametrize("change, message", [
    ("train.seed=5", r"train.seed differs from the checkpoint's \(0 -> 5; the saved data position"),
    ("train.micro_batch_size=4", r"train.micro_batch_size differs from the checkpoint's \(2 -> 4;"),
    ("data.max_length=128", r"data.max_length differs from the checkpoint's \(256 -> 128;"),
    ("data.shuffle=false", r"data.shuffle differs from the checkpoint's \(True -> False;"),
    ("precision.mode=bf16_pure", r"precision.mode differs from the checkpoint's \(fp32 -> bf16_pure; bf16_pure "
                                 r"and fp8_pure keep bf16 weights"),
    ("precision.mode=fp8_pure", r"precision.mode differs from the checkpoint's \(fp32 -> fp8_pure; bf16_pure "
                                r"and fp8_pure keep bf16 weights"),
])
def test_a_setting_the_checkpoint_depends_on_is_refused_before_the_data_is_read(checkpointed_run, data_never_read,
                                                                                 change, message):
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000002: " + message + r".*: resume with the same "
                                          r"setting, or start a new run in a new output_dir "
                                          r"\(checkpoint.resume=never\)"):
        train(load_config(None, checkpointed_run + [change]))


def test_a_checkpoint_past_max_steps_is_refused_before_the_data_is_read(checkpointed_run, data_never_read):
    with pytest.raises(ConfigError, match=r"step_00000002 is at step 2, past train.max_steps=1: set train.max_steps "
                                          r"above 2 to train on"):
        train(load_config(None, checkpointed_run + ["train.max_steps=1"]))


def test_every_refused_setting_is_named_at_once(checkpointed_run, data_never_read):
    with pytest.raises(ConfigError, match=r"optim.name differs .*; train.seed differs .*; data.shuffle differs"):
        train(load_config(None, checkpointed_run + ["optim.name=lion", "train.seed=5", "data.shuffle=false"]))


def test_changed_clipping_and_matmul_precision_are_reported_as_applied(checkpointed_run, capsys):
    capsys.readouterr()
    summary = train(load_config(None, checkpointed_run + ["train.max_grad_norm=0.5", "precision.mode=bf16_mixed"]))
    err = capsys.readouterr().err
    assert summary["steps"] == 3
    assert ("train.max_grad_norm: 1.0 -> 0.5 (gradients are clipped to the new norm from the resumed step on)"
            in err)
    assert ("precision.mode: fp32 -> bf16_mixed (the matmuls run in the new precision from the resumed step on "
            "(the weights and the optimizer state keep their dtype))" in err)


def test_float8_matmuls_switch_on_over_the_same_bf16_weights_on_resume(recipe_corpus, tokenizer_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """bf16_pure -> fp8_pure keeps the weights and optimizer state as saved (both bf16), so it resumes and is
    reported as applied, unlike a change between bf16 and fp32 weights (refused above)."""
    lift_float8_device_check(monkeypatch)
    base = [f"data.path={recipe_corpus[0]}", f"data.tokenizer={tokenizer_dir}", f"output_dir={tmp_path}",
            "model.preset=debug", "objective=sft", "data.format=recipe", "data.max_length=256",
            "train.micro_batch_size=2", "train.device=cpu", "logging.progress=false", "checkpoint.every=2",
            "checkpoint.save_final=false"]
    train(load_config(None, base + ["precision.mode=bf16_pure", "train.max_steps=2", "checkpoint.resume=never"]))
    capsys.readouterr()
    summary = train(load_config(None, base + ["precision.mode=fp8_pure", "train.max_steps=3",
                                              "checkpoint.resume=auto"]))
    assert summary["steps"] == 3
    assert "precision.mode: bf16_pure -> fp8_pure (the matmuls run in the new precision" in capsys.readouterr().err
