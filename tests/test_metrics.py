"""MetricsLogger files and text output, throughput/MFU/memory helpers, and the provenance record."""
import json
import socket
import sys

import pytest
import torch

from optrush.bench.provenance import provenance
from optrush.config.schema import LoggingConfig
from optrush.train.metrics import MetricsLogger, Throughput, device_peak_flops, matmul_peak_flops, mfu, \
    peak_memory_gib


def test_jsonl_text_lines_and_summary(tmp_path, capsys):
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=20) as logger:
        for step, loss in ((5, 3.0), (10, 2.0), (15, 2.5)):
            logger.log(step, {"loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0 * step, "mfu": 0.25,
                              "peak_mem_gib": step / 10, "trained_tokens": 64})
        logger.log(15, {"eval_loss": 2.75, "eval_ppl": 15.6})
        record = logger.summary({"params": 123, "provenance": {"torch": "x"}})

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 15]
    assert rows[1]["loss"] == 2.0 and rows[1]["trained_tokens"] == 64 and "elapsed_s" in rows[1]
    assert rows[3] == {"step": 15, "elapsed_s": rows[3]["elapsed_s"], "eval_loss": 2.75, "eval_ppl": 15.6}

    out = capsys.readouterr().out  # pytest's captured stdout is no TTY: plain lines, no bar
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert lines[0] == "step  5/20 | loss 3.0000 | lr 1.00e-03 | tok/s 5.0k | mfu 25.0% | mem 0.50 GiB"
    assert lines[3] == "step 15/20 | eval_loss 2.7500 | eval_ppl 15.60"
    assert "run summary" in out and "min_loss" in out

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == record
    assert summary["steps"] == 15 and summary["final_loss"] == 2.5 and summary["min_loss"] == 2.0
    assert summary["mean_tokens_per_s"] == pytest.approx(10000.0) and summary["peak_mem_gib"] == 1.5
    assert summary["params"] == 123 and summary["provenance"] == {"torch": "x"} and summary["time_s"] >= 0


def test_resume_appends_and_tensor_metric_is_rejected(tmp_path):
    for start in (0, 1):
        with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=2, start_step=start) as logger:
            logger.log(start + 1, {"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=2) as logger:
        with pytest.raises(TypeError, match="'loss' is a tensor"):
            logger.log(1, {"loss": torch.tensor(1.0)})


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "rank1"
    with MetricsLogger(output_dir=out_dir, cfg=LoggingConfig(), total_steps=2, enabled=False) as logger:
        logger.log(1, {"loss": 1.0})
        assert logger.summary({"x": 1}) == {}
    assert not out_dir.exists() and capsys.readouterr().out == ""


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(tensorboard=True), total_steps=1)


def test_throughput_skips_first_step_and_windows():
    meter = Throughput(window=2)
    meter.update(tokens=1000, seconds=100.0)  # warm-up/compile step: ignored
    assert meter.tokens_per_s is None
    meter.update(tokens=100, real_tokens=50, seconds=1.0)
    assert meter.tokens_per_s == 100.0 and meter.real_tokens_per_s == 50.0
    meter.update(tokens=300, seconds=1.0)
    meter.update(tokens=500, seconds=3.0)  # window of 2: the 100-token step has left
    assert meter.tokens_per_s == pytest.approx(800 / 4) and meter.real_tokens_per_s == pytest.approx(800 / 4)


def test_mfu_and_peaks(monkeypatch):
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(None, 6e9, 1e13) is None and mfu(1000.0, 6e9, None) is None
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    cases = [("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12), ("NVIDIA H200", torch.float32, 494e12),
             ("NVIDIA H100 PCIe", torch.float16, 756e12), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
             ("NVIDIA L4", torch.bfloat16, 121e12), ("Tesla T4", torch.bfloat16, None),
             ("NVIDIA H100 80GB HBM3", torch.float64, None)]
    for name, dtype, peak in cases:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_flops(torch.device("cuda", 0), dtype) == peak, name
    # the training log, bench and plan divide by the peak of the precision the matmuls run in (FP8 for float8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    peaks = {mode: matmul_peak_flops(torch.device("cuda", 0), mode)
             for mode in ("fp32", "bf16_mixed", "bf16_pure", "fp8", "fp8_pure")}
    assert peaks == {"fp32": 494e12, "bf16_mixed": 989e12, "bf16_pure": 989e12, "fp8": 1979e12, "fp8_pure": 1979e12}
    assert matmul_peak_flops(torch.device("cpu"), "fp8_pure") is None
    assert 0.01 < peak_memory_gib(torch.device("cpu")) < 64


def test_provenance_is_json_and_personal_data_free():
    record = provenance()
    json.dumps(record)
    assert record["torch"] == torch.__version__ and record["timestamp_utc"].endswith("+00:00")
    assert {"git_sha", "python", "transformers", "cuda", "devices"} <= record.keys()
    assert socket.gethostname() not in record.values()


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(tensorboard=True), total_steps=1) as logger:
        logger.log(1, {"loss": 1.0, "note": "text is skipped"})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_the_objectives_own_metrics_show_on_the_console(tmp_path, capsys):
    with MetricsLogger(output_dir=tmp_path, cfg=LoggingConfig(), total_steps=2) as logger:
        logger.log(1, {"loss": 0.6, "accuracy": 0.75, "reward_gap": 0.25})  # a reward model
        logger.log(2, {"eval_loss": 0.5, "eval_accuracy": 0.8})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines == ["step 1/2 | loss 0.6000 | accuracy 0.750 | reward_gap 0.250",
                     "step 2/2 | eval_loss 0.5000 | eval_accuracy 0.800"]
