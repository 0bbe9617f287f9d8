"""An override can correct a bad value in the YAML file, and an error names where the bad value was set: the
file and line, or the override."""
import pytest

from optrush.config import ConfigError, load_config

BASE = ["model.preset=debug", "data.tokenizer=tok"]


@pytest.mark.parametrize("text, override", [
    ("train:\n  lr: fast\n", "train.lr=1e-4"),
    ("train:\n  lrr: 1\n", "train={lr: 1e-4}"),
    ("data: {packing: bdf}\n", "data.packing=bfd"),
    ("train: 3\n", "train={max_steps: 5}"),
])
def test_an_override_corrects_the_file(text, override, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    load_config(path, BASE + [override])  # the file alone is invalid; merged, it is not


def test_a_bad_override_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"^override train\.lr=fast: train\.lr='fast': expected a number"):
        load_config(path, BASE + ["train.lr=fast"])


@pytest.mark.parametrize("text, overrides, expected", [
    ("model:\n  preset: debug\ntrain:\n  lr: -1\n", ["data.tokenizer=tok"],
     r"train\.lr=-1\.0: must be > 0 \(from .*run\.yaml:4\)"),
    ("train:\n  lr: 1e-3\n", BASE + ["train.lr=-1"], r"train\.lr=-1\.0: must be > 0 \(from override train\.lr=-1\)"),
    ("train:\n  warmup_steps: 500\n", BASE + ["train.max_steps=10"],
     r"exceeds train\.max_steps=10 \(from .*run\.yaml:2, override train\.max_steps=10\)"),
])
def test_out_of_range_values_name_where_they_were_set(text, overrides, expected, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, overrides)


def test_an_override_into_a_value_names_where_the_value_was_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: debug\ntrain: 3\n")
    with pytest.raises(ConfigError, match=r"train is a value, not a section \(train is set at .*run\.yaml:3\)"):
        load_config(path, ["train.lr=1e-4"])
