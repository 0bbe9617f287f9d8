"""`optrush bench` on CPU: the debug preset on synthetic tokens runs the real training step and writes its report;
`--ladder` runs rungs and an HF peer in their own processes and reports skipped and failed rungs as such."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optrush.bench.ladder import (DEFAULT_LADDER, Ladder, Rung, add_loss_deltas, best_over_peers, is_config_key,
                                  load_ladder, median_run, override, plan_ladder)
from optrush.bench.peers import PadCollator, peer_rows, peer_skip_reason
from optrush.bench.run import bench, markdown_table, prepare, train_step
from optrush.cli.main import main
from optrush.config import ConfigError, load_config
from optrush.parallel.distributed import init_distributed


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


def test_bench_passes_the_lora_plus_ratio_to_the_optimizer(monkeypatch):
    import optrush.bench.run as run

    seen = []
    real = run.build_optimizer
    monkeypatch.setattr(run, "build_optimizer", lambda *a, **kw: seen.append(kw["lora_plus_ratio"]) or real(*a, **kw))
    cfg = load_config(None, TINY + ["peft.method=lora", "peft.lora_plus_ratio=8"], synthetic_data=True)
    bench(cfg, synthetic=True, warmup=1, steps=1)
    assert seen == [8.0]


def test_bench_on_real_packed_data_counts_padding(debug_overrides):
    cfg = load_config(None, debug_overrides + ["data.packing=bfd", "compile.mode=none"])
    result = bench(cfg, synthetic=False, warmup=1, steps=2)
    assert not result["synthetic"] and 0 <= result["padding_fraction"] < 1
    assert result["real_tokens_per_s"] == pytest.approx(result["tokens_per_s"] * (1 - result["padding_fraction"]))


def test_markdown_table_reports_failures():
    table = markdown_table([{"name": "huge", "status": "failed", "reason": "CUDA out of memory"}])
    assert "| huge | failed: CUDA out of memory |" in table


# ------------------------------------------------------------------------------------------------------ ladder

TINY = ["model.preset=debug", "train.device=cpu", "train.micro_batch_size=2", "data.max_length=32"]
LADDER_YAML = """\
reference: baseline
rungs:
  - name: baseline
    set: {precision.mode: fp32, compile.mode: none}
  - name: +flex attention
    set: {model.attention: flex}
  - name: +fsdp
    set: {parallel.strategy: fsdp}
    min_gpus: 2
  - name: planted failure
    set: {model.preset: null, model.path: /nonexistent/model}
"""


@pytest.mark.slow
def test_ladder_with_hf_peer_end_to_end(tmp_path, capsys):
    """Two rung processes and the HF Trainer peer on the same saved debug model (each process imports torch: the
    cost of this test): a skipped rung (flex on CPU), a GPU-count skip, a planted failure, the loss delta and the
    ratio over the best peer, JSON/markdown/PNG."""
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(LADDER_YAML)
    out = tmp_path / "out"
    code = main(["bench", *TINY, "--synthetic", "--warmup", "1", "--steps", "1", "--ladder", str(ladder),
                 "--out", str(out), "--peers", "hf_default,trl_sft_packed"])
    assert code == 0
    record = json.loads((out / "ladder.json").read_text())
    rungs = {r["name"]: r for r in record["rungs"]}
    assert [r["status"] for r in record["rungs"]] == ["ok", "skipped", "skipped", "failed"]
    assert "model.attention=flex needs a CUDA GPU" in rungs["+flex attention"]["reason"]
    assert rungs["+fsdp"]["reason"] == "needs 2 GPUs, 0 visible"
    failure = rungs["planted failure"]
    assert "/nonexistent/model" in failure["reason"] and "loss_delta" not in failure
    # the skipped rungs are not carried on; the failed one carries everything that ran
    assert failure["overrides"] == ["precision.mode=fp32", "compile.mode=none", "model.preset=null",
                                    "model.path=/nonexistent/model"]
    base = rungs["baseline"]
    # the rungs trained the shared saved model; it is removed, so the record names the preset it came from
    assert base["config"]["model"]["path"] is None and base["config"]["model"]["preset"] == "debug"
    assert not (out / "model").exists()
    assert base["peak_mem_kind"] == "cpu_peak_rss" and base["peak_mem_gib"] > 0 and len(base["losses"]) == 2
    assert base["loss_delta"] == 0 and base["tokens_per_s"] > 0

    hf, trl = record["peers"]
    assert hf["status"] == "ok" and hf["stack"] == "HF Trainer" and len(hf["losses"]) == 2
    assert hf["tokens_per_s"] > 0 and hf["padding_fraction"] == 0  # the rungs' synthetic rows: full, unpadded
    assert abs(hf["losses"][0] - base["losses"][0]) < 0.05  # same saved weights, same rows in the same order
    assert trl["status"] == ("ok" if peer_skip_reason("trl_sft_packed") is None else "skipped")
    best = max((p for p in (hf, trl) if p["status"] == "ok"), key=lambda p: p["real_tokens_per_s"])
    assert record["best_rung"] == "baseline" and record["best_peer"] == best["name"]
    assert record["ratio_over_best_peer"] == pytest.approx(base["real_tokens_per_s"] / best["real_tokens_per_s"])

    markdown = (out / "ladder.md").read_text()
    assert "| optrush | +flex attention | skipped: " in markdown and "| optrush | planted failure | failed: " in markdown
    assert f"**best optrush rung: baseline**, {record['ratio_over_best_peer']:.2f}x" in markdown
    assert "peak GiB (cpu_peak_rss)" in markdown and "torch " in markdown
    for chart in ("tokens", "memory", "loss"):
        assert (out / f"ladder_{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "model").exists()  # the shared model is an intermediate
    assert "planted failure: failed" in capsys.readouterr().out
    # each rung and peer was appended as it finished, so a run cut short keeps them
    finished = [json.loads(line) for line in (out / "finished.jsonl").read_text().splitlines()]
    assert [r["name"] for r in finished] == [r["name"] for r in record["rungs"] + record["peers"]]


def test_plan_carries_rungs_that_apply_and_skips_the_rest():
    ladder = Ladder(reference="a", rungs=(
        Rung("a", ("precision.mode=fp32",)), Rung("pack", ("data.packing=bfd",)),
        Rung("again", ("precision.mode=fp32",)), Rung("missing", ("optim.nosuchkey=1",)),
        Rung("ac", ("activations.checkpointing=full",))))
    plan = plan_ladder(None, TINY, ladder, synthetic=True, gpus=0)
    skipped = {p.rung.name: p.skipped for p in plan}
    assert skipped["a"] is None and skipped["ac"] is None
    assert skipped["pack"].startswith("synthetic data")
    assert skipped["again"].startswith("same resolved config")
    assert "unknown config key 'optim.nosuchkey'" in skipped["missing"]
    assert plan[-1].overrides == ["precision.mode=fp32", "activations.checkpointing=full"]
    on_data = plan_ladder(None, TINY, ladder, synthetic=False, gpus=0)  # no data.tokenizer: every rung rejected
    assert all(p.skipped for p in on_data) and "data.tokenizer must name a tokenizer" in on_data[0].skipped


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_default_ladder_on_cpu_skips_gpu_only_rungs(device):
    base = [o for o in TINY if not o.startswith("train.device=")] + [f"train.device={device}"]
    plan = {p.rung.name: p.skipped for p in plan_ladder(None, base, DEFAULT_LADDER, synthetic=True, gpus=0)}
    assert list(plan) == [r.name for r in DEFAULT_LADDER.rungs] and len(plan) == 12
    assert plan["baseline"] is None and plan["+bf16"] is None and plan["+torch.compile"] is None
    assert "model.attention=varlen needs a CUDA GPU" in plan["+efficient attention"]
    assert plan["+FSDP2"] == "needs 2 GPUs, 0 visible"
    assert [name for name, reason in plan.items() if reason] == ["+packing", "+efficient attention", "+FSDP2"]


def test_train_device_auto_is_checked_against_this_machine():
    from optrush.config.machine import load_config_for_machine

    flex = ["model.preset=debug", "model.attention=flex", "data.packing=bfd"]
    assert load_config_for_machine(None, flex, gpus=1, synthetic_data=True).train.device == "auto"
    with pytest.raises(ConfigError, match="model.attention=flex needs a CUDA GPU"):
        load_config_for_machine(None, flex, gpus=0, synthetic_data=True)
    assert load_config(None, flex, synthetic_data=True).train.device == "auto"  # any machine's config: accepted


def test_load_ladder_from_yaml_and_its_errors(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("rungs:\n  - name: a\n    set: {train.lr: 1e-4, kernels.fused_loss: true, data.tokenizer: 'yes'}\n"
                    "  - name: b\n    min_gpus: 2\n")
    ladder = load_ladder(path)
    assert ladder.reference == "a" and ladder.rungs[1] == Rung("b", (), min_gpus=2)
    assert ladder.rungs[0].overrides == ("train.lr=1e-4", "kernels.fused_loss=true", 'data.tokenizer="yes"')
    cfg = load_config(None, TINY + list(ladder.rungs[0].overrides), synthetic_data=True)
    assert cfg.train.lr == 1e-4 and cfg.kernels.fused_loss is True and cfg.data.tokenizer == "yes"
    assert load_ladder("default") is DEFAULT_LADDER
    assert all(is_config_key(o.split("=")[0]) for rung in DEFAULT_LADDER.rungs for o in rung.overrides)
    for text, message in (("rungs: []", "non-empty 'rungs:'"), ("rungs:\n  - name: a\n    sett: {}", "unknown key"),
                          ("rungs:\n  - name: a\n  - name: a", "unique"),
                          ("rungs:\n  - name: a\n    set: {train.lrr: 1}", r"rung 1 \(a\): unknown config key "
                                                                            r"'train.lrr'. Did you mean 'train.lr'"),
                          ("reference: z\nrungs:\n  - name: a", "reference 'z' is not a rung name")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_ladder(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_ladder(tmp_path / "missing.yaml")
    assert override("model.path", "/a b") == "model.path=/a b" and override("x", None) == "x=null"


def test_loss_deltas_and_ratio_over_best_peer():
    rungs = [{"name": "base", "status": "ok", "loss": 2.0, "real_tokens_per_s": 100.0},
             {"name": "fast", "status": "ok", "loss": 2.5, "real_tokens_per_s": 300.0},
             {"name": "oom", "status": "failed", "reason": "OutOfMemoryError"}]
    peers = [{"name": "hf", "status": "ok", "real_tokens_per_s": 150.0},
             {"name": "trl", "status": "skipped", "reason": "not installed: trl"}]
    assert add_loss_deltas(rungs, reference="base") == "base"
    assert [r.get("loss_delta") for r in rungs] == [0.0, 0.5, None]
    assert best_over_peers(rungs, peers) == {"best_rung": "fast", "best_peer": "hf", "ratio_over_best_peer": 2.0}
    assert best_over_peers(rungs, peers[1:])["ratio_over_best_peer"] is None
    # an fp32 baseline out of memory: the first rung that ran stands in, and the record names it
    rungs.insert(0, rungs.pop())
    assert add_loss_deltas(rungs, reference="oom") == "base"
    assert rungs[2]["loss_delta"] == 0.5 and "loss_delta" not in rungs[0]


def test_repeats_report_the_median_run_or_the_failure():
    runs = [{"status": "ok", "tokens_per_s": v, "run": i} for i, v in enumerate((30.0, 10.0, 20.0))]
    chosen = median_run(runs)
    assert chosen["run"] == 2 and chosen["tokens_per_s_runs"] == [30.0, 10.0, 20.0]
    assert chosen["tokens_per_s_stdev"] == pytest.approx(10.0)
    assert median_run([runs[0], {"status": "failed", "reason": "OOM"}])["status"] == "failed"


def test_peer_rows_unshift_labels_and_pad(debug_overrides):
    cfg = load_config(None, debug_overrides)
    rows = peer_rows(cfg, synthetic=False, vocab_size=512, n_steps=1)
    row = rows[0]
    assert len(row["input_ids"]) == len(row["labels"]) and row["labels"][0] == -100
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained and all(label in (-100, token) for token, label in zip(row["input_ids"], row["labels"]))
    assert len(trained) > 0 and any(label == -100 for label in row["labels"][1:])  # the prompt is masked (sft)
    batch = PadCollator(pad_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_ladder_resume_keeps_what_an_earlier_run_finished(tmp_path, monkeypatch):
    """--resume: rungs measured by a run cut short are read back from finished.jsonl, not run again; a failed rung
    and a rung whose overrides changed are run again."""
    import optrush.bench.ladder as ladder_module

    ran, attempts = [], []

    def fake_child(command, *, name, **_):
        ran.append(name)
        if name == "broken" and ran.count("broken") + attempts.count("broken") == 1:  # fails the first time only
            return {"name": name, "status": "failed", "reason": "OutOfMemoryError"}
        return {"name": name, "status": "ok", "loss": 2.0, "tokens_per_s": 10.0, "real_tokens_per_s": 10.0,
                "peak_mem_gib": 1.0, "wall_s": 1.0}

    monkeypatch.setattr(ladder_module, "run_child", fake_child)
    rungs = (Rung("base", ("precision.mode=fp32",)), Rung("broken", ("kernels.fused_loss=true",)),
             Rung("+bf16", ("precision.mode=bf16_mixed",)))
    common = dict(synthetic=True, warmup=1, steps=1, out_dir=tmp_path)
    overrides = ["model.preset=debug", "train.device=cpu"]
    ladder_module.run_ladder(None, overrides, ladder=Ladder(rungs=rungs, reference="base"), **common)
    assert ran == ["base", "broken", "+bf16"]
    attempts.extend(ran)
    ran.clear()
    changed = (rungs[0], rungs[1], Rung("+bf16", ("precision.mode=bf16_pure",)))
    record = ladder_module.run_ladder(None, overrides, ladder=Ladder(rungs=changed, reference="base"), resume=True,
                                      **common)
    assert ran == ["broken", "+bf16"]
    assert [r["status"] for r in record["rungs"]] == ["ok", "ok", "ok"]
    finished = [json.loads(line)["name"] for line in (tmp_path / "finished.jsonl").read_text().splitlines()]
    assert finished == ["base", "broken", "+bf16", "broken", "+bf16"]
    ran.clear()
    ladder_module.run_ladder(None, overrides, ladder=Ladder(rungs=changed, reference="base"), **common)
    assert ran == ["base", "broken", "+bf16"]  # without --resume everything runs again


def test_interrupted_bench_stops_the_rung_it_is_running(tmp_path):
    """SIGINT to a ladder (what `timeout -s INT` sends to benchmarks/ladder_h100.sh, which execs the bench) stops
    the rung's process too: none may outlive the bench and keep its GPU."""
    pid_file = tmp_path / "rung.pid"
    sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    # Python keeps SIGINT ignored in a process started with it ignored (a background job of a non-interactive
    # shell: how pytest itself may run), so the bench process takes the handler a foreground start gives it
    bench = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             f"from pathlib import Path; from optrush.bench.ladder import run_child; "
             f"run_child([sys.executable, '-c', {sleeper!r}, {str(pid_file)!r}], name='rung', timeout_s=None, "
             f"logs=Path({str(tmp_path)!r}))")
    parent = subprocess.Popen([sys.executable, "-c", bench])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    rung = int(pid_file.read_text())
    parent.send_signal(signal.SIGINT)
    assert parent.wait(timeout=60) != 0  # interrupted
    with pytest.raises(ProcessLookupError):
        os.kill(rung, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [["kernels.fused_loss=true"], ["kernels.fused_loss=true", "compile.mode=model"]],
                         ids=["eager", "compiled"])
def test_a_training_step_never_waits_for_the_gpu(extra):
    """The step queues forward, backward, clipping and the optimizer without a host sync (a loss `.item()` or the
    grad norm read mid-step left the GPU idle while the host queued the next phase): CUDA's sync debug mode
    raises on any sync."""
    cfg = load_config(None, TINY + ["train.device=cuda", "precision.mode=bf16_pure", *extra], synthetic_data=True)
    parallel = init_distributed(cfg.parallel, device=torch.device("cuda"))
    run = prepare(cfg, parallel, synthetic=True, n_steps=3)
    for micro_batches in run.batches[:2]:  # first use: compilation, lazy initialisation
        train_step(run, micro_batches, max_grad_norm=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, units = train_step(run, run.batches[2], max_grad_norm=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(loss)) and units == cfg.train.micro_batch_size * cfg.data.max_length


def test_qlora_benchmark_smoke_runs_a_case_and_both_peers(tmp_path):
    """`benchmarks/qlora.py --smoke`: an optrush case and the transformers + PEFT peers (with and without bf16
    autocast), each in its own process as on the GPU, all finish (the peer once failed on CPU: the script's folder
    shadowed the `kernels` package), and the summary that `--repeats N` adds gives the optrush case a ratio over
    each peer (built here from the one round). One optrush case of four: each is a process start-up of its own,
    and they differ only in overrides, which the config tests cover."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "qlora.py"), "--smoke", "--out", str(tmp_path),
                           "--name", "smoke", "--only", "qlora nf4,peer"], capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert [r.get("error") for r in results] == [None] * len(results)
    assert {r["kind"] for r in results} == {"optrush", "peer"}
    assert sorted(r.get("autocast", False) for r in results if r["kind"] == "peer") == [False, True]
    assert all(r["tokens_per_s"] > 0 for r in results)
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from qlora import summary_table
    finally:
        sys.path[:] = [p for p in sys.path if p != str(root / "benchmarks")]
    optrush_rows = [line for line in summary_table(results) if line.startswith("| optrush")]
    assert len(optrush_rows) == 1 and all(line.count("x (") == 2 for line in optrush_rows)


def test_memory_peak_replay_finds_the_highest_moment_and_what_was_live():
    """benchmarks/memory_peak.py's replay of allocator trace events: the peak is the highest running total, and
    the blocks live then are grouped by their innermost non-torch frame (then optrush's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from memory_peak import frame_key, grouped, peak_allocations
    finally:
        sys.path.pop(0)
    graph = [{"filename": "/x/torch/nn/f.py", "line": 1, "name": "f"},
             {"filename": "/tmp/torchinductor_u/ab/cab.py", "line": 7, "name": "call"},
             {"filename": "/r/optrush/parallel/checkpointing.py", "line": 9, "name": "recompute"}]
    loss = [{"filename": "/r/optrush/kernels/fused_loss.py", "line": 3, "name": "chunk"}]

    def alloc(addr, size, frames):
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames}

    def free(addr):  # the allocator's statistic drops at the request; completion may come later (side streams)
        return {"action": "free_requested", "addr": addr}

    events = [alloc(1, 100, loss), alloc(2, 50, graph), free(1), {"action": "free_completed", "addr": 1},
              alloc(3, 120, graph), alloc(4, 10, graph), free(3), alloc(5, 40, loss)]
    peak = peak_allocations(events)
    assert peak["peak_bytes"] == 180 and peak["peak_index"] == 5
    assert sorted(b["addr"] for b in peak["live"]) == [2, 3, 4]
    assert frame_key(graph) == "cab.py:7 call < checkpointing.py:9 recompute"
    assert frame_key(loss) == "fused_loss.py:3 chunk" and frame_key([]) == "(no Python frame)"
    assert [(g["where"], g["count"]) for g in grouped(peak["live"])] == [(frame_key(graph), 3)]
