"""Fixes from a fourth user walkthrough (multi-process training, `optrush check`; the demo's is in
test_readme.py): each test failed before its fix."""
import json
import os
import socket
import subprocess
import warnings
from types import SimpleNamespace

import pytest
import torch

import optrush.check.multi_gpu as multi_gpu
from optrush.check import run_checks
from optrush.cli.main import main
from optrush.config import load_config

# ------------------------------------------------------------------------------------- check: multi_gpu group


def fake_training(losses, grad_norms, *, rank_losses, rank_grad_norms):
    """A stand-in for the check's child `optrush train` runs: writes the metrics.jsonl a run would log, the
    torchrun ranks' (`--nproc` in the command) or the single process's."""
    def run(command, **kwargs):
        out = next(arg.split("=", 1)[1] for arg in command if arg.startswith("output_dir="))
        ranks = "--nproc" in command
        rows = zip(rank_losses if ranks else losses, rank_grad_norms if ranks else grad_norms)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for step, (loss, norm) in enumerate(rows, 1):
                f.write(json.dumps({"step": step, "loss": loss, "grad_norm": norm}) + "\n")
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


def multi_gpu_row(debug_overrides, monkeypatch, extra, **logs):
    # the check's own name for the module: git (provenance) still runs through the real one
    monkeypatch.setattr(multi_gpu, "subprocess", SimpleNamespace(run=fake_training([6.0, 5.0], [2.0, 1.0], **logs)))
    (row,) = run_checks(load_config(None, [*debug_overrides, *extra]), only=["multi_gpu"], steps=2).rows
    return row


def test_multi_gpu_check_catches_gradients_off_by_a_constant_factor(debug_overrides, monkeypatch):
    """Ranks whose gradients are half the true ones (each rank forgetting that ddp averages) train the same
    losses under Lion or unclipped Adam; only the gradient norms show it."""
    row = multi_gpu_row(debug_overrides, monkeypatch, ["parallel.strategy=ddp"], rank_losses=[6.0, 5.0],
                        rank_grad_norms=[1.0, 0.5])
    assert row.passed is False and row.switch_to_turn_off == "parallel.strategy=none", row
    assert "gradient norms 0.5" in row.detail


def test_multi_gpu_check_holds_bf16_gradient_reduction_to_bf16_tolerances(debug_overrides, monkeypatch):
    """bf16 reduce-scatter under fp32 compute differs by bf16 rounding (measured on CPU: losses 5e-4, gradient
    norms 2e-2 over 6 steps): a valid setting, not a fault; beyond the bf16 bounds the row names the switch."""
    bf16_reduce = ["parallel.strategy=fsdp", "parallel.reduce_dtype=bf16"]
    row = multi_gpu_row(debug_overrides, monkeypatch, bf16_reduce, rank_losses=[6.0, 5.0025],
                        rank_grad_norms=[2.0, 1.02])
    assert row.passed is True, row
    row = multi_gpu_row(debug_overrides, monkeypatch, bf16_reduce, rank_losses=[6.0, 5.0025],
                        rank_grad_norms=[2.0, 1.2])
    assert row.passed is False and row.switch_to_turn_off == "parallel.reduce_dtype=fp32", row


# ----------------------------------------------------------------------------------------- check: data group


def test_pad_equal_to_eos_fails_the_pad_row_and_not_the_padding_row(debug_overrides, tokenizer_dir, tmp_path):
    """A tokenizer padding with its EOS: the "pad token != EOS" row says so. Padding is found by position, so it is
    still never trained; counting every trained EOS as a trained pad token failed that row too, and its advice
    (data.packing=none) would not have helped."""
    pad_is_eos = tmp_path / "tokenizer"
    pad_is_eos.mkdir()
    for file in tokenizer_dir.iterdir():
        text = file.read_text()
        if file.name in ("tokenizer_config.json", "special_tokens_map.json"):
            settings = json.loads(text)
            settings["pad_token"] = settings["eos_token"]
            text = json.dumps(settings)
        (pad_is_eos / file.name).write_text(text)
    rows = run_checks(load_config(None, [*debug_overrides, f"data.tokenizer={pad_is_eos}"]), only=["data"]).rows
    status = {row.name: row.passed for row in rows}
    assert status["data: pad token != EOS"] is False
    assert status["data: padding never trained"] is True


# ------------------------------------------------------------------------------------------ train --nproc N


@pytest.mark.parametrize("settings, message", [
    (["parallel.strategy=hsdp", "parallel.replicate=2"], "--nproc 3: parallel.replicate=2 must divide"),
    (["parallel.strategy=ddp", "context.degree=2", "data.packing=none"], "--nproc 3: context.degree=2 must divide"),
    (["parallel.strategy=ddp", "checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume=/nonexistent/ckpt"),
])
def test_nproc_the_config_cannot_split_stops_before_any_process_starts(settings, message, debug_overrides,
                                                                       monkeypatch, capsys):
    """Found in every rank, the error was printed once per process, followed by torchrun's traceback."""
    import optrush.parallel.launch as launch

    for name in launch.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(launch, "run_torchrun", started.append)
    assert main(["train", *debug_overrides, *settings, "--nproc", "3"]) == 2
    assert not started and message in capsys.readouterr().err


def test_ddp_is_applied_without_a_deprecation_warning_on_every_rank(monkeypatch):
    """ddp's first forward does not warn that broadcast_buffers is deprecated (torch 2.13's FutureWarning about a
    setting optrush makes on purpose, printed by every rank of every ddp run). One rank, in this process: a forked
    rank can hang on a lock some thread of the test session held at the fork."""
    from optrush.models import build_model
    from optrush.models.llama import ModelArgs
    from optrush.parallel.distributed import init_distributed, teardown
    from optrush.parallel.fsdp import apply_data_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    cfg = load_config(None, ["model.preset=debug", "data.tokenizer=unused", "parallel.strategy=ddp"])
    init_distributed(cfg.parallel, device=torch.device("cpu"))
    try:
        model = build_model(ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
                            seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_data_parallel(model, cfg)
            model(torch.tensor([[1, 2, 3]]))  # replicate builds its DistributedDataParallel here
    finally:
        teardown()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "broadcast_buffers" in m], messages
