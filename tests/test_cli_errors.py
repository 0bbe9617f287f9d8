"""generate, chat, eval and bench refuse bad arguments with one clear message before any work (and before any text
is printed); a broken checkpoint is named at load; --seed seeds the whole command once."""
import io
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from optrush.cli.main import main

GENERATE = ["--prompt", "Recipe: Soup\n", "--max-new-tokens", "4"]


@pytest.fixture
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint[0])


@pytest.fixture
def heldout(recipe_corpus, tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(recipe_corpus[0].read_text().splitlines(keepends=True)[:3]))
    return str(path)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("optrush.generate.load.load_for_generation", refuse)


@pytest.mark.parametrize("device, message", [("cuda", "--device cuda: this machine has 0 CUDA device(s) that torch "
                                                     "can use; use --device cpu"),
                                             ("tpu", "--device tpu: not a device name; use cpu, cuda")])
def test_a_device_this_machine_lacks_is_named_before_the_model_loads(ckpt, heldout, device, message, monkeypatch,
                                                                     no_model_loads, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU-only machine, whatever runs the test
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    for command in (["generate", ckpt, *GENERATE], ["chat", ckpt], ["eval", ckpt, "--data", heldout]):
        assert main([*command, "--device", device]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tiny_checkpoint, heldout, tmp_path, capsys):
    broken = tmp_path / "diverged"
    shutil.copytree(tiny_checkpoint[0], broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    for command in (["generate", str(broken), *GENERATE, "--temperature", "1", "--device", "cpu"],
                    ["eval", str(broken), "--data", heldout, "--device", "cpu"]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert f"{broken}: 1 of " in captured.err and "weight tensors hold NaN or inf" in captured.err
        assert "training run diverged" in captured.err and captured.out == ""


def test_too_many_new_tokens_stop_generate_before_the_prompt_is_printed(ckpt, capsys):
    assert main(["generate", ckpt, "--prompt", "hi", "--max-new-tokens", "300", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "--max-new-tokens 300: the model's context holds 256 tokens" in captured.err and captured.out == ""


def test_seed_seeds_the_whole_command_once(ckpt, capsys):
    """The same prompt twice draws two continuations (each prompt takes the next random numbers); the same seed
    repeats the whole output."""
    command = ["generate", ckpt, "--prompt", "Recipe:", "--prompt", "Recipe:", "--max-new-tokens", "24",
               "--temperature", "1", "--seed", "7", "--device", "cpu"]
    assert main(command) == 0
    out = capsys.readouterr().out
    first, second = (part.split("\n", 1)[1] for part in out.split("--- prompt ")[1:])
    assert first != second
    assert main(command) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "the same seed repeats the whole output" in " ".join(capsys.readouterr().out.split())


def test_eval_writes_its_report_into_a_missing_directory(ckpt, heldout, tmp_path):
    out = tmp_path / "evalrep" / "sub" / "report.md"
    assert main(["eval", ckpt, "--data", heldout, "--samples", "1", "--max-new-tokens", "2", "--max-length", "128",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "| perplexity |" in out.read_text() and out.with_suffix(".json").is_file()


def test_eval_arguments_are_checked_as_generate_checks_them(ckpt, heldout, no_model_loads, capsys):
    assert main(["eval", ckpt, "--data", heldout, "data.on_eror=skip", "--device", "cpu"]) == 2
    assert "unknown config key 'data.on_eror'. Did you mean 'data.on_error'?" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", heldout, "--max-new-tokens", "0", "--device", "cpu"]) == 2
    assert "--max-new-tokens 0: ask for at least 1 new token" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", heldout, "--temperature", "-1", "--device", "cpu"]) == 2
    assert "--temperature -1.0: use 0" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", heldout, "--samples", "-1", "--device", "cpu"]) == 2
    assert "--samples -1: give how many prompts of the file to generate from, 0 or more" in capsys.readouterr().err
    assert main(["eval", ckpt, "--data", heldout, "--max-length", "0", "--device", "cpu"]) == 2
    assert "--max-length 0: give the most tokens an example keeps, 1 or more" in capsys.readouterr().err


def test_bench_warmup_help_and_checks_agree(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--ladder and --peers need at least 1" in " ".join(capsys.readouterr().out.split())
    for flags in (["--ladder", "default"], ["--peers"], ["--peers", "hf_default"]):
        assert main(["bench", "no-such-config.yaml", "--synthetic", "--warmup", "0", *flags]) == 2
        assert "--warmup 0: --ladder and --peers need at least 1 warm-up step" in capsys.readouterr().err
    for flags, message in ((["--warmup", "-1"], "--warmup -1: use 0"), (["--steps", "0"], "--steps 0: use 1"),
                           (["--ladder", "default", "--repeats", "0"], "--repeats 0: use 1")):
        assert main(["bench", "no-such-config.yaml", "--synthetic", *flags]) == 2
        assert message in capsys.readouterr().err
