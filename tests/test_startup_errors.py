"""Bad configuration stops a run at start-up, before any data is read, with a message naming the key: an unknown
preset, a resume path or a reward function that does not exist, an output_dir that cannot be created, and a YAML
boolean given for a key that takes a word."""
import pytest

from optrush.cli.main import main
from optrush.config import ConfigError, load_config
from optrush.config.checks import PRESET_NAMES
from optrush.models.presets import PRESETS
from optrush.objectives.grpo import import_reward
from optrush.train import train


def test_unknown_preset_fails_when_the_config_loads(debug_overrides):
    with pytest.raises(ConfigError, match=r"model.preset='qwen3' is not a built-in architecture. Did you mean "
                                          r"'qwen3-0.6b'\? Valid presets: debug, demo.*override model.preset=qwen3"):
        load_config(None, [*debug_overrides, "model.preset=qwen3"])
    with pytest.raises(ConfigError, match=r"model.preset='llama9' is not a built-in architecture. Valid presets"):
        load_config(None, ["model.preset=llama9"], complete=False)


def test_the_configs_preset_names_are_the_presets():
    assert PRESET_NAMES == tuple(PRESETS)


def test_yaml_boolean_for_a_word_says_to_quote_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  packing: yes\nmodel:\n  preset: off\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: data.packing=True: expected one of none, sorted, bfd. "
                                          r"\(YAML reads yes/no/on/off/true/false as booleans.*quote it"):
        load_config(path, complete=False)
    with pytest.raises(ConfigError, match=r"model.preset=False: expected str or null \(YAML reads yes/no"):
        load_config(path, ["data.packing=none"], complete=False)
    with pytest.raises(ConfigError, match=r"train.lr=True: expected a number$"):  # no word wanted, so no hint
        load_config(path, ["data.packing=none", "model.preset=debug", "train.lr=yes"], complete=False)


@pytest.mark.parametrize("resume, message", [
    ("nosuchdir", r"checkpoint.resume=nosuchdir: no such checkpoint directory \(a relative path is taken from the "
                  r"working directory"),
    ("{tmp_path}", r"is not a resumable training checkpoint \(it holds no trainer_state.pt\)"),
], ids=["missing", "not_a_checkpoint"])
def test_resume_path_that_is_no_checkpoint_fails_before_the_data_is_read(debug_overrides, data_never_read, tmp_path,
                                                                          resume, message):
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, [*debug_overrides, f"checkpoint.resume={resume.format(tmp_path=tmp_path)}"]))


@pytest.mark.parametrize("reward, message", [
    ("no_such_module_xyz:score", r"grpo.rewards: cannot import module 'no_such_module_xyz'"),
    ("absent.py:score", r"grpo.rewards: 'absent.py:score' names the file absent.py, which does not exist"),
    ("optrush.objectives.grpo:no_such_function", r"grpo.rewards: optrush.objectives.grpo has no function"),
], ids=["module", "file", "function"])
def test_unimportable_reward_fails_before_the_data_is_read(debug_overrides, data_never_read, reward, message):
    grpo = [*debug_overrides, "objective=grpo", "data.packing=none", f"grpo.rewards=[{reward}]"]
    with pytest.raises(ConfigError, match=message):
        train(load_config(None, grpo))


def test_a_reward_file_runs_once_though_checked_at_start_up(tmp_path):
    log = tmp_path / "imports.log"
    (tmp_path / "counted.py").write_text(f"open({str(log)!r}, 'a').write('imported\\n')\n"
                                         "def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    first = import_reward(f"{tmp_path / 'counted.py'}:score")
    assert import_reward(f"{tmp_path / 'counted.py'}:score") is first
    assert log.read_text() == "imported\n"


def test_a_reward_file_that_failed_to_import_is_run_again_once_fixed(tmp_path):
    reward = tmp_path / "broken.py"
    reward.write_text("raise RuntimeError('not yet')\n")
    with pytest.raises(RuntimeError, match="not yet"):
        import_reward(f"{reward}:score")
    reward.write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert import_reward(f"{reward}:score")(["p"], ["c"]) == [1.0]


def test_output_dir_that_cannot_be_created_is_a_config_error_naming_it(debug_overrides, data_never_read, tmp_path,
                                                                        capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    assert main(["train", *debug_overrides, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"optrush: config error: output_dir={out}: cannot create the directory (Not a directory")
    assert "Traceback" not in err


def test_output_dir_that_exists_but_cannot_be_written_is_a_config_error(debug_overrides, data_never_read,
                                                                        monkeypatch, capsys):
    """A read-only directory used to fail at the first checkpoint, after tokenizing and training."""
    import optrush.train.loop as loop

    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", f"{dir}/tmpabc")

    monkeypatch.setattr(loop.tempfile, "TemporaryFile", read_only)  # root (CI) may write anywhere: simulate it
    assert main(["train", *debug_overrides]) == 2
    err = capsys.readouterr().err
    assert "output_dir=" in err and "cannot write to the directory (Permission denied" in err
