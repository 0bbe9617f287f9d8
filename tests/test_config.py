"""Config loading: YAML + dotted overrides, and the start-up errors users see for bad keys, types and files."""
import typing
from pathlib import Path

import pytest
import yaml

from optrush.cli.main import main
from optrush.config import Config, ConfigError, load_config
from optrush.config.load import all_keys, set_dotted

DEMO = Path(__file__).resolve().parents[1] / "optrush" / "recipes" / "demo.yaml"

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
    with pytest.raises(ConfigError, match="bad.yaml:2: not valid YAML"):
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


def list_of_str_keys() -> list[str]:
    """Every dotted key whose field is a list of strings (alone or in a union, like peft.target_modules)."""
    keys = []
    for key in all_keys(Config):
        section = Config
        *parents, leaf = key.split(".")
        for part in parents:
            section = typing.get_type_hints(section)[part]
        kind = typing.get_type_hints(section)[leaf]
        if list[str] in (kind, *typing.get_args(kind)):
            keys.append(key)
    return keys


def resolved(cfg: Config, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("key", list_of_str_keys())
def test_one_string_for_a_list_field_is_a_one_item_list(key, tmp_path):
    value = "q_proj" if key == "peft.target_modules" else "a:b"  # valid for every such field
    cfg = load_config(None, BASE + ["peft.method=lora", f"{key}={value}"])
    assert resolved(cfg, key) == [value]
    tree = {}  # the same from a YAML file
    set_dotted(tree, key, value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert resolved(load_config(path, BASE + ["peft.method=lora"]), key) == [value]


def test_single_target_module_from_cli_and_yaml(tmp_path):
    from optrush.peft.lora import target_names

    cfg = load_config(None, BASE + ["peft.method=lora", "peft.target_modules=q_proj"])
    assert cfg.peft.target_modules == ["q_proj"] and target_names(cfg.peft.target_modules) == {"wq"}  # not letters
    path = tmp_path / "lora.yaml"
    path.write_text("peft:\n  method: lora\n  target_modules: v_proj\n")
    assert load_config(path, BASE).peft.target_modules == ["v_proj"]
    assert load_config(None, BASE + ["peft.method=lora"]).peft.target_modules == "all-linear"


@pytest.mark.parametrize("value, expected", [
    ("qq_proj", "peft.target_modules: unknown module name.s. 'qq_proj'; use all-linear or a list of names from "
                "q_proj, k_proj"),
    ("all_linear", "unknown module name.s. 'all_linear'"),
    ("[]", "peft.target_modules: an empty list"),
])
def test_unknown_target_modules_fail_at_load(value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, BASE + ["peft.method=lora", f"peft.target_modules={value}"])


@pytest.mark.parametrize("text, expected", [
    ("model:\n  preset: debug\ntrain:\n  lrr: 1\n", r"run\.yaml:4: unknown config key 'train\.lrr'\. Did you mean"),
    ("train:\n  max_steps: 3\n  lr: fast\n", r"run\.yaml:3: train\.lr='fast': expected a number"),
    ("data: {packing: bdf}\n", r"run\.yaml:1: data\.packing='bdf': expected one of"),
    ("train: 3\n", r"run\.yaml:1: train must be a mapping"),
    ("train:\n  lr: 1\n\tmax_steps: 2\n", r"run\.yaml:3: not valid YAML \(found character '\\t'"),
    ("train: [1, 2\n", r"run\.yaml:2: not valid YAML .*flow sequence that begins at line 1, column 8"),
])
def test_yaml_file_errors_name_the_file_and_line(text, expected, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, BASE)


def test_missing_file_suggests_the_shipped_recipe(tmp_path):
    with pytest.raises(ConfigError, match="e.g. optrush/recipes/demo.yaml") as err:
        load_config(tmp_path / "nope.yaml")
    suggested = str(err.value).rsplit("e.g. ", 1)[1].rstrip(")")
    assert (DEMO.parents[2] / suggested).is_file()


def test_incomplete_config_loads_with_complete_false():
    with pytest.raises(ConfigError, match="data.tokenizer must name a tokenizer"):
        load_config(DEMO)
    cfg = load_config(DEMO, complete=False)
    assert cfg.model.preset == "demo" and cfg.data.tokenizer is None
    assert load_config(None, complete=False).model.path is None
    # only what a run must still be given is waived: contradictions and bad values still fail
    with pytest.raises(ConfigError, match="set exactly one of model.path"):
        load_config(None, ["model.preset=debug", "model.path=x"], complete=False)
    with pytest.raises(ConfigError, match="train.grad_accum=0: must be >= 1"):
        load_config(DEMO, ["train.grad_accum=0"], complete=False)
