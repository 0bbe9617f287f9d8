"""The training loop's equivalence classes: accumulation == large batch, resume == uninterrupted, atomic saves."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from optrush.config import load_config
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.models.io import build_model, load_model
from optrush.models.presets import get_preset
from optrush.objectives import build_objective
from optrush.train import train
from optrush.train.loop import accumulate_gradients, clip_gradients

ROOT = Path(__file__).resolve().parents[1]


def padded_batch(seqs: list[list[int]], labels: list[list[int]]) -> Batch:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
    return Batch(input_ids=ids, labels=lab, position_ids=torch.arange(width).expand(len(seqs), width).clone(),
                 attention_lengths=torch.tensor([len(s) for s in seqs]))


def test_accumulated_gradients_equal_large_batch():
    torch.manual_seed(0)
    args = get_preset("debug")
    lengths = [5, 17, 9, 30]  # uneven on purpose: a per-micro-batch mean would weight tokens differently
    seqs = [torch.randint(0, args.vocab_size, (n + 1,)).tolist() for n in lengths]
    inputs = [s[:-1] for s in seqs]
    labels = [s[1:] for s in seqs]
    labels[1][:6] = [IGNORE_INDEX] * 6  # a masked prompt

    def grads(micro_batches):
        model = build_model(args, dtype=torch.float32, device="cpu", seed=0)
        loss, units = accumulate_gradients(model, build_objective("causal_lm"), micro_batches, device="cpu",
                                           autocast=nullcontext())
        return float(loss) / units, {n: p.grad.clone() for n, p in model.named_parameters()}

    big_loss, big = grads([padded_batch(inputs, labels)])
    acc_loss, acc = grads([padded_batch([i], [l]) for i, l in zip(inputs, labels)])
    assert abs(big_loss - acc_loss) < 1e-6
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_adamw_clips_inside_its_step_with_clip_grad_norms_result(dtype, device):
    """With torch's fused AdamW, clip_gradients only measures the norm and the kernel divides the gradients by the
    clipping factor; the weights, moments and (written back by the kernel) gradients equal clip_grad_norm_ followed
    by the same optimizer. Max norm 0.05: every step clips. bf16: one step, as a rounding difference in one step's
    gradient moves the next steps' weights by whole bf16 ulps."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    args = get_preset("debug")
    ids = torch.randint(0, args.vocab_size, (2, 33))
    batch = padded_batch(ids[:, :-1].tolist(), ids[:, 1:].tolist())
    runs = {}
    for in_step in (True, False):
        model = build_model(args, dtype=dtype, device=device, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        for _ in range(4 if dtype == torch.float32 else 1):
            accumulate_gradients(model, build_objective("causal_lm"), [batch], device=device, autocast=nullcontext())
            if in_step:
                norm = clip_gradients(model, 0.05, optimizer)
                assert optimizer.grad_scale > 1
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            optimizer.step()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.zero_grad(set_to_none=True)
        runs[in_step] = norm, grads, dict(model.named_parameters()), optimizer.state
    (norm, grads, params, state), (ref_norm, ref_grads, ref_params, ref_state) = runs[True], runs[False]
    # fp32: a few ulps (divide vs multiply); bf16: clip_grad_norm_ rounds the clipped gradient to bf16, the kernel
    # does not, so the moments differ by up to half a bf16 ulp of the gradient, the weights by a fraction of lr
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(norm, ref_norm, **tolerance)
    for name in params:
        torch.testing.assert_close(grads[name], ref_grads[name], **tolerance)
        torch.testing.assert_close(params[name], ref_params[name], **tolerance)
        torch.testing.assert_close(state[params[name]]["exp_avg"], ref_state[ref_params[name]]["exp_avg"], **tolerance)


def test_clip_gradients_keeps_clip_grad_norm_for_other_optimizers():
    model = build_model(get_preset("debug"), dtype=torch.float32, device="cpu", seed=0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    norm = clip_gradients(model, 1.0, optimizer)
    assert not hasattr(optimizer, "grad_scale") and norm > 1
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(total, torch.tensor(1.0), rtol=1e-5, atol=0)


def test_training_reduces_loss_and_saves_hf_checkpoint(debug_overrides, tmp_path):
    cfg = load_config(None, debug_overrides + ["train.max_steps=12", "data.eval_fraction=0.1",
                                               "train.eval_every=6"])
    summary = train(cfg)
    assert summary["steps"] == 12 and summary["final_loss"] < summary["losses"][0]
    assert "eval_loss" in summary
    run = Path(cfg.output_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 13))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.randint(0, 100, (1, 12))
    ours = load_model(run / "final")
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


@pytest.mark.parametrize("packing", ["bfd", "none"])
def test_grad_accum_run_equals_large_batch_run(debug_overrides, packing, tmp_path):
    """Two micro-batches of 2 rows per step train like one micro-batch of the same 4 rows, step after step."""
    base = debug_overrides + [f"data.packing={packing}", "checkpoint.save_final=false", "train.max_steps=3"]
    big = train(load_config(None, base + ["train.micro_batch_size=4", f"output_dir={tmp_path / 'a'}"]))
    small = train(load_config(None, base + ["train.micro_batch_size=2", "train.grad_accum=2",
                                            f"output_dir={tmp_path / 'b'}"]))
    assert max(abs(x - y) for x, y in zip(big["losses"], small["losses"])) < 1e-5


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_sigkill_then_resume_equals_uninterrupted(debug_overrides, tmp_path, capsys):
    base = [o for o in debug_overrides if not o.startswith(("output_dir", "checkpoint.resume"))]
    # enough steps after the awaited checkpoint that the kill always lands mid-run
    base += ["train.max_steps=30", "checkpoint.every=2", "train.deterministic=true", "checkpoint.keep_last=2"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # the runs that end normally train in this process (the same code as the CLI's, without a second start-up)
    train(load_config(None, base + [f"output_dir={straight}"]))

    # kill -9 the run once it has written a checkpoint past the first, mid-training
    proc = subprocess.Popen([sys.executable, "-m", "optrush", "train", *base, f"output_dir={interrupted}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = interrupted / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step_00000004").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step_00000004").exists() and not (interrupted / "final").exists()

    train(load_config(None, base + [f"output_dir={interrupted}", "checkpoint.resume=auto"]))
    assert "resumed from" in capsys.readouterr().out
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((interrupted / "summary.json").read_text())
    assert len(a["losses"]) == len(b["losses"]) == 30
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= 1e-6
    wa, wb = weights(straight), weights(interrupted)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import optrush.train.checkpoint as ckpt
    from optrush.config import load_config
    from optrush.train import train
    real_save_model = ckpt.save_model
    calls = []
    def dying_save_model(model, path):
        calls.append(path)
        real_save_model(model, path)
        if len(calls) == 2:  # the second checkpoint: die after the weights, before the rename
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_model = dying_save_model
    train(load_config(None, sys.argv[1:]))
""")


def test_kill_during_checkpoint_write_keeps_previous(debug_overrides, tmp_path, capsys):
    base = [o for o in debug_overrides if not o.startswith(("output_dir", "checkpoint.resume"))]
    base += ["train.max_steps=6", "checkpoint.every=2", "train.deterministic=true", f"output_dir={tmp_path / 'r'}"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *base], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step_00000002"]
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # the half-written one
    train(load_config(None, base + ["checkpoint.resume=auto"]))  # in this process: one start-up less
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002" in out and "removed an incomplete checkpoint" in out
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 6


def test_verify_runs_the_fast_checks_before_training(debug_overrides, tmp_path):
    summary = train(load_config(None, debug_overrides + ["train.verify=true", "train.max_steps=2",
                                                         "checkpoint.save_final=false"]))
    report = json.loads((tmp_path / "run" / "check.json").read_text())
    assert summary["steps"] == 2 and report["passed"] is True


def test_training_reports_what_data_parallel_leaves_out_of_an_epoch(debug_overrides, monkeypatch, capsys):
    """With W data-parallel replicas the plan's last len(plan) % W micro-batches are left out of the epoch; the run
    says how many, and how many examples they hold (here rank 0 of 7 replicas, simulated in one process)."""
    import optrush.train.loop as loop

    loaders, make_loader = [], loop.make_loader

    def recording_make_loader(*args, **kwargs):
        loaders.append(make_loader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(loop, "data_parallel_position", lambda degree: (0, 7))
    monkeypatch.setattr(loop, "make_loader", recording_make_loader)
    train(load_config(None, [*debug_overrides, "train.max_steps=2"]))
    batches, examples = loaders[0].left_out
    assert 0 < batches < 7 and examples >= batches
    assert f"the plan's last {batches} are left out of epoch 0 ({examples} examples" in capsys.readouterr().out
