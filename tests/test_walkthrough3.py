"""Fixes from a third user walkthrough (plan, bench, generate, export, data stats/inspect): each test failed before
its fix."""
import json

import pytest

from optrush.cli.main import main
from optrush.config import load_config


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `optrush ARGV`; a SystemExit's message counts as its output."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code, message = 1, str(exit_.code)
    else:
        message = ""
    captured = capsys.readouterr()
    return code, captured.out + captured.err + message


# ----------------------------------------------------------------------------------------------------- plan

PLAN = ["plan", "--model", "debug", "--gpus", "1xL4", "--seq", "64", "--micro-batch", "1"]


def test_plan_pin_with_a_typo_names_the_key_instead_of_nothing_fits(capsys):
    code, out = run_cli([*PLAN, "--pin", "compile.mod=none"], capsys)
    assert code == 2 and "--pin compile.mod=none" in out and "Did you mean 'compile.mode'" in out
    assert "nothing fits" not in out
    code, out = run_cli([*PLAN, "--pin", "compile.mode=nonee"], capsys)
    assert code == 2 and "expected one of none, blocks, model" in out


def test_plan_pin_of_a_value_the_search_never_tries_says_which_option_sets_it(capsys):
    code, out = run_cli([*PLAN, "--pin", "optim.name=lion"], capsys)
    assert code == 2 and "tries only optim.name = adamw" in out and "--optim" in out
    code, out = run_cli([*PLAN, "--gpus", "1x3090", "--pin", "precision.mode=fp8"], capsys)  # no FP8 cores
    assert code == 2 and "precision.mode = bf16_pure, bf16_mixed" in out
    code, out = run_cli([*PLAN, "--pin", "precision.mode=fp8_pure"], capsys)  # an L4 has them: searched
    assert code == 0 and "fp8_pure" in out and "nothing fits" not in out and "leave padding" not in out
    code, out = run_cli([*PLAN, "--packing", "none"], capsys)  # full-row speeds: padding is not priced
    assert code == 0 and "leave padding in unpacked (none) batches" in out and "--packing bfd packs them" in out
    # the message reads the setups the search tried: with --micro-batch, that one size only
    code, out = run_cli([*PLAN, "--micro-batch", "4", "--pin", "train.micro_batch_size=8"], capsys)
    assert code == 2 and "tries only train.micro_batch_size = 4 (set it with --micro-batch)" in out


def test_plan_pins_that_cannot_validate_together_give_the_config_error(capsys):
    code, out = run_cli([*PLAN, "--pin", "activations.offload=true", "compile.mode=model"], capsys)
    assert code == 2 and "activations.offload=true needs compile.mode=blocks or none" in out


@pytest.mark.parametrize("option, value", [("--seq", "0"), ("--micro-batch", "0"), ("--margin", "1.5"),
                                           ("--top", "0")])
def test_plan_rejects_counts_and_fractions_out_of_range(capsys, option, value):
    code, out = run_cli([*PLAN, option, value], capsys)
    assert code == 2 and f"{option} {value}" in out


def test_plan_writes_pins_of_keys_it_does_not_choose_into_the_config(tmp_path, capsys, tokenizer_dir):
    out = tmp_path / "plan.yaml"
    code, _ = run_cli([*PLAN, "--pin", "train.lr=2e-5", "--tokenizer", str(tokenizer_dir), "--out", str(out)],
                      capsys)
    assert code == 0 and load_config(out).train.lr == pytest.approx(2e-5)


# ---------------------------------------------------------------------------------------------------- bench

def test_ladder_progress_line_shows_every_line_of_a_skip_reason():
    from optrush.bench.ladder import progress_line

    line = progress_line({"stack": "optrush", "name": "+attention", "status": "skipped",
                          "reason": "invalid configuration:\n  - model.attention=varlen needs a CUDA GPU"})
    assert line.endswith("invalid configuration: - model.attention=varlen needs a CUDA GPU")


def test_max_context_limit_below_the_start_is_a_config_error_naming_the_option(capsys):
    code, out = run_cli(["bench", "model.preset=debug", "train.device=cpu", "data.max_length=256",
                         "--max-context", "0"], capsys)
    assert code == 2 and "--max-context 0" in out and "data.max_length=256" in out


def test_single_bench_report_says_what_its_peak_memory_is():
    from optrush.bench.run import bench, report_markdown

    cfg = load_config(None, ["model.preset=debug", "train.device=cpu", "data.max_length=32",
                             "train.micro_batch_size=1"], synthetic_data=True)
    result = bench(cfg, synthetic=True, warmup=0, steps=1)
    assert "peak GiB (cpu_peak_rss): peak resident memory" in report_markdown([result])


# ------------------------------------------------------------------------------------------------- generate

@pytest.mark.parametrize("option, value, message", [
    ("--top-p", "1.5", "--top-p 1.5: use a probability in (0, 1], or leave the option out"),
    ("--temperature", "-1", "--temperature -1.0: use 0 (greedy)"),
    ("--repetition-penalty", "0", "--repetition-penalty 0.0: use a positive value"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: ask for at least 1 new token")])
def test_generate_rejects_bad_sampling_options_before_loading_or_printing(tmp_path, capsys, option, value, message):
    code, out = run_cli(["generate", str(tmp_path / "no_model"), "--prompt", "Recipe: Soup", option, value], capsys)
    assert code == 2 and out.startswith(f"optrush: config error: {message}")  # no prompt echoed, no model needed


def test_contrastive_search_refuses_the_sampling_options_it_would_ignore(tmp_path, capsys):
    code, out = run_cli(["generate", str(tmp_path / "no_model"), "--prompt", "x", "--penalty-alpha", "0.6",
                         "--top-k", "4", "--temperature", "0.3", "--seed", "1"], capsys)
    assert code == 2 and "--temperature, --seed: contrastive search" in out
    code, out = run_cli(["generate", str(tmp_path / "no_model"), "--prompt", "x", "--penalty-alpha", "1.5",
                         "--top-k", "4"], capsys)
    assert code == 2 and "--penalty-alpha 1.5" in out


# ------------------------------------------------------------------------------------------------ data, export

def test_data_inspect_refuses_a_count_below_one(capsys, debug_overrides):
    code, out = run_cli(["data", "inspect", *debug_overrides, "--n", "-1"], capsys)
    assert code == 2 and "--n -1" in out


def test_gguf_export_of_a_lora_checkpoint_says_to_merge_first(tmp_path):
    pytest.importorskip("gguf")
    from optrush.models.gguf import export_gguf

    step = tmp_path / "checkpoints" / "step_00000010"  # a LoRA run's checkpoint: adapter/, tokenizer, no model
    (step / "adapter").mkdir(parents=True)
    (step / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="merge it first"):
        export_gguf(step, tmp_path / "model.gguf")
