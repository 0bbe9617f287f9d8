"""The base a model.preset adapter run writes to `<output_dir>/base/` (written once, checked at every later start,
written under fsdp too), and resuming a model.path run whose model folder was moved."""
import json
import re
import shutil

import pytest
import torch

from optrush.config import ConfigError, load_config
from optrush.data.tokenizer import load_tokenizer
from optrush.models import io
from optrush.models.io import build_model, load_model, save_model
from optrush.models.presets import get_preset
from optrush.peft.export import ADAPTER_CONFIG, PRESET_BASE_FILE
from optrush.train import train

LORA = ["peft.method=lora", "peft.r=4", "peft.save=adapter", "train.max_steps=2", "checkpoint.every=2"]


def test_base_is_written_once_and_a_resume_keeps_it(debug_overrides, tmp_path, monkeypatch):
    train(load_config(None, debug_overrides + LORA))
    base = tmp_path / "run" / "base"
    monkeypatch.setattr(io, "_save_native", lambda *a, **k: pytest.fail("base/ written again on resume"))
    train(load_config(None, debug_overrides + LORA + ["checkpoint.resume=auto", "train.max_steps=3"]))
    assert json.loads((base / PRESET_BASE_FILE).read_text())["train.seed"] == 0
    adapter = tmp_path / "run" / "final" / "adapter" / ADAPTER_CONFIG
    assert json.loads(adapter.read_text())["base_model_name_or_path"] == str(base)


def test_another_seed_into_the_same_output_dir_is_refused(debug_overrides, tmp_path):
    train(load_config(None, debug_overrides + LORA + ["checkpoint.save_final=false", "checkpoint.every=0"]))
    base = tmp_path / "run" / "base"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(base))} holds the random base of another run "
                                          r"\(train.seed: 0 -> 1; .*train into another output_dir"):
        train(load_config(None, debug_overrides + LORA + ["train.seed=1"]))


def test_a_base_written_before_fingerprints_is_written_again_once(debug_overrides, tmp_path, capsys):
    train(load_config(None, debug_overrides + LORA + ["checkpoint.save_final=false", "checkpoint.every=0"]))
    base = tmp_path / "run" / "base"
    (base / PRESET_BASE_FILE).unlink()  # as an older optrush left it
    (base.parent / ".base.tmp-killed").mkdir()  # as a run killed mid-write leaves it
    capsys.readouterr()
    train(load_config(None, debug_overrides + LORA + ["checkpoint.save_final=false"]))
    assert f"{base} has no {PRESET_BASE_FILE}" in capsys.readouterr().out
    assert (base / PRESET_BASE_FILE).is_file() and (base / "tokenizer.json").is_file()
    assert not [path.name for path in base.parent.iterdir() if ".tmp-" in path.name]


# ----------------------------------------------------------------------------------- a moved model.path

def saved_model(directory, tokenizer_dir, *, seed: int):
    vocab = len(load_tokenizer(tokenizer_dir))
    save_model(build_model(get_preset("debug", vocab_size=vocab), seed=seed), directory)
    return directory


def test_resume_accepts_a_moved_model_folder_and_refuses_another_model(debug_overrides, tokenizer_dir, tmp_path,
                                                                       capsys):
    first = saved_model(tmp_path / "models" / "a", tokenizer_dir, seed=0)
    common = [o for o in debug_overrides if o != "model.preset=debug"] + [
        "train.max_steps=2", "checkpoint.every=2", "checkpoint.save_final=false"]
    train(load_config(None, common + [f"model.path={first}"]))
    moved = tmp_path / "models" / "renamed"
    first.rename(moved)
    resume = common + ["checkpoint.resume=auto", "train.max_steps=3", "checkpoint.every=1"]  # saves its path
    capsys.readouterr()
    assert train(load_config(None, resume + [f"model.path={moved}"]))["steps"] == 3
    out, err = capsys.readouterr()
    assert f"model.path changed from {first} to {moved}" in out and "model.path" not in err
    other = saved_model(tmp_path / "models" / "other", tokenizer_dir, seed=1)  # same config and sizes, other weights
    changed = re.escape(f"({moved} -> {other})")
    with pytest.raises(ConfigError, match=rf"model.path differs from the checkpoint's {changed} and holds another "
                                          r"model \(its weights differ\).*checkpoint.resume=never"):
        train(load_config(None, resume + ["train.max_steps=4", f"model.path={other}"]))
    shutil.rmtree(moved)
    other.rename(moved)  # another model where the checkpoint's was
    with pytest.raises(ConfigError, match=rf"the model at model.path={re.escape(str(moved))} is not the checkpoint's"):
        train(load_config(None, resume + ["train.max_steps=4", f"model.path={moved}"]))


# ----------------------------------------------------------------------------------- fsdp

def test_preset_lora_run_under_fsdp_saves_the_base_its_adapters_name(debug_overrides, tokenizer_dir, tmp_path):
    from test_distributed import run_ranks

    from optrush.generate.load import load_for_generation

    run = tmp_path / "run"
    common = [o for o in debug_overrides if not o.startswith("data.max_length")] + [
        "data.max_length=128", "data.prefetch=0", "peft.method=lora", "peft.r=4", "peft.save=both",
        "train.max_steps=1"]
    run_ranks(common + ["parallel.strategy=fsdp"], world=2)
    vocab = len(load_tokenizer(tokenizer_dir))
    expected = build_model(get_preset("debug", vocab_size=vocab), seed=0).state_dict()
    for name, tensor in load_model(run / "base").state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    adapter = run / "final" / "adapter"
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(run / "base")
    merged, _ = load_for_generation(run / "final")
    adapted, _ = load_for_generation(adapter=adapter)  # the adapter over base/
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), merged(ids), atol=1e-5, rtol=1e-4)
    written = (run / "base" / "model.safetensors").stat()
    shutil.move(run / "final", tmp_path / "first_final")  # (a new run refuses to replace another's final/)
    run_ranks(common + ["parallel.strategy=fsdp"], world=2)  # a second start finds base/ and gathers nothing
    assert (run / "base" / "model.safetensors").stat().st_ino == written.st_ino
