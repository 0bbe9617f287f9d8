"""Config loading: YAML + dotted overrides, and the start-up errors users see for bad keys, types and files."""
import pytest

from optrush.cli.main import main
from optrush.config import ConfigError, load_config

BASE = ["model.preset=debug", "data.tokenizer=tok"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  max_steps: 7\ndata:\n  packing: none\n")
    cfg = load_config(path, BASE + ["train.lr=2e-4", "optim.betas=[0.9, 0.99]", "optim.fused=null"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.data.packing == "none"
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.fused is None


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1e-4", "unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
    ("lr=1e-4", "Did you mean 'train.lr'?"),
    ("trian.lr=1e-4", "Did you mean 'train'?"),
    ("train.lr=fast", "train.lr='fast': expected a number"),
    ("train.max_steps=2.5", "train.max_steps=2.5: expected an integer"),
    ("data.packing=bdf", "expected one of none, sorted, bfd. Did you mean 'bfd'?"),
    ("train.deterministic=maybe", "expected true or false"),
    ("optim.betas=[0.9]", "expected a list of 2 values"),
    ("train=3", "train must be a mapping"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("?", r"\?").replace(".", r"\.")):
        load_config(None, BASE + [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


@pytest.mark.parametrize("overrides, expected", [
    ([], "set exactly one of model.path"),
    (["model.preset=debug", "model.path=x", "data.tokenizer=t"], "set exactly one of model.path"),
    (["model.preset=debug"], "data.tokenizer must name a tokenizer"),
    (BASE + ["objective=sft"], "objective=sft trains on completions only"),
    (BASE + ["train.grad_accum=0"], "train.grad_accum=0: must be >= 1"),
    (BASE + ["precision.mode=bf16_mixed", "train.deterministic=true"], "deterministic=true needs precision"),
    (BASE + ["train.warmup_steps=500", "train.max_steps=10"], "exceeds train.max_steps"),
    (BASE + ["train.device=cuda", "model.attention=flex", "data.packing=sorted"], "flex with data.packing=sorted"),
    (BASE + ["kernels.fused_dequantize=true"], "fused_dequantize=true speeds up the dequantization"),
    (BASE + ["data.max_length=2048", "data.batch_tokens=1024"], "data.batch_tokens=1024: must be 0 .* >= data.max"),
    # preference pairs too: unpacked pair rows are as wide as the step's longest (a new flex compile per width;
    # measured on an H100: the 8 steps of one padded run used up dynamo's recompile limit, then flex ran eagerly)
    (BASE + ["train.device=cuda", "model.attention=flex", "objective=dpo", "data.format=preference",
             "data.shared_prompt=true", "data.packing=none"], "flex with data.packing=none"),
])
def test_incompatible_combinations_fail_at_start(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_cli_config_show_prints_resolved_config(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: debug\ndata:\n  tokenizer: tok\n")
    assert main(["config", "show", str(path), "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "preset: debug" in out


def test_cli_config_error_exit_code(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: debug\ndata:\n  tokenizer: tok\n")
    assert main(["config", "show", str(path), "train.lrr=1"]) == 2
    assert "Did you mean 'train.lr'?" in capsys.readouterr().err
