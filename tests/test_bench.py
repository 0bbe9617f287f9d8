"""`optrush bench` on CPU: the debug preset on synthetic tokens runs the real training step and writes its report."""
import json
import math

import pytest

from optrush.bench.run import bench, markdown_table
from optrush.cli.main import main
from optrush.config import ConfigError, load_config


def test_bench_cli_synthetic_debug_writes_json_and_markdown(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  preset: debug\ntrain:\n  device: cpu\n  micro_batch_size: 2\ndata:\n  max_length: 64\n")
    out = tmp_path / "out"
    code = main(["bench", str(recipe), f"output_dir={out}", "activations.checkpointing=full", "train.grad_accum=2",
                 "--synthetic", "--warmup", "1", "--steps", "2"])
    assert code == 0
    assert "| tiny |" in capsys.readouterr().out
    [result] = json.loads((out / "bench.json").read_text())
    assert result["name"] == "tiny" and result["synthetic"] and result["steps"] == 2 and len(result["losses"]) == 3
    assert result["tokens_per_s"] > 0 and result["real_tokens_per_s"] == result["tokens_per_s"]
    assert result["padding_fraction"] == 0 and result["mfu"] is None  # no known peak FLOP/s on CPU
    assert abs(result["losses"][0] - math.log(512)) < 0.5  # random tokens over the debug vocabulary
    assert result["config"]["activations"]["checkpointing"] == "full" and "torch" in result["provenance"]
    markdown = (out / "bench.md").read_text()
    assert "| tiny |" in markdown and "1 warm-up + 2 timed steps" in markdown


def test_bench_is_repeatable_and_respects_precision():
    overrides = ["model.preset=debug", "train.device=cpu", "train.micro_batch_size=2", "data.max_length=32"]
    first = bench(load_config(None, overrides, synthetic_data=True), synthetic=True, warmup=1, steps=1)
    again = bench(load_config(None, overrides, synthetic_data=True), synthetic=True, warmup=1, steps=1)
    assert first["losses"] == again["losses"]
    with pytest.raises(ConfigError, match="precision.mode=fp8 needs an NVIDIA GPU"):
        bench(load_config(None, overrides + ["precision.mode=fp8"], synthetic_data=True), synthetic=True)


def test_bench_on_real_packed_data_counts_padding(debug_overrides):
    cfg = load_config(None, debug_overrides + ["data.packing=bfd", "compile.mode=none"])
    result = bench(cfg, synthetic=False, warmup=1, steps=2)
    assert not result["synthetic"] and 0 <= result["padding_fraction"] < 1
    assert result["real_tokens_per_s"] == pytest.approx(result["tokens_per_s"] * (1 - result["padding_fraction"]))


def test_markdown_table_reports_failures():
    table = markdown_table([{"name": "huge", "error": "CUDA out of memory"}])
    assert "| huge | failed: CUDA out of memory |" in table
