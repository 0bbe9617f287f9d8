"""benchmarks/profile_step.py on CPU: kernel categories, the GPU busy time as a union of intervals, the per-step
summary from device events, and a smoke run through the real training step (the GPU run is the script itself)."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("profile_step")


def test_kernel_names_fall_into_their_categories(script):
    names = {
        "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer + clipping",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "triton (inductor-fused)",
        "Memcpy HtoD (Pinned -> Device)": "copies and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copies and fills",
        "void at::native::reduce_kernel<512, 1>": "other",
    }
    assert {name: script.category(name) for name in names} == names


def test_busy_time_counts_overlapping_kernels_once(script):
    assert script.union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert script.union_us([]) == 0


def event(name, start, end, *, device=True, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation,
                           device_type=torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU)


def test_device_events_leave_out_host_events_and_annotations(script):
    kernel = event("nvjet_a", 0, 1)
    events = [kernel, event("aten::mm", 0, 1, device=False), event("Optimizer.step#AdamW.step", 0, 9, annotation=True)]
    assert script.device_events(events) == [kernel]


def test_summary_per_step(script):
    events = [event("nvjet_a", 0, 600), event("flash_fwd", 600, 800), event("nvjet_a", 1000, 1600),
              event("triton_poi_fused_0", 1500, 1700)]  # two steps; the Triton kernel overlaps a matmul
    summary = script.summarize(events, steps=2, wall_s=1e-3, tokens=100, matmul_flops=6e9, attention_flops=1e9)
    assert summary["gpu_busy_s_per_step"] == pytest.approx(750e-6)  # (800 + 700 us) / 2
    assert summary["kernel_s_per_step"] == pytest.approx(800e-6)
    matmul = summary["categories"]["matmul"]
    assert matmul["s_per_step"] == pytest.approx(600e-6) and matmul["share_of_kernel_time"] == pytest.approx(0.75)
    assert matmul["model_tflops"] == pytest.approx(6e9 / 600e-6 / 1e12)
    assert summary["categories"]["attention"]["model_tflops"] == pytest.approx(1e9 / 100e-6 / 1e12)
    assert list(summary["categories"]) == ["matmul", "attention", "triton (inductor-fused)"]
    assert summary["top_kernels"][0] == {"name": "nvjet_a", "s_per_step": pytest.approx(600e-6),
                                         "calls_per_step": 1, "category": "matmul"}


def test_smoke_run_writes_the_report(script, tmp_path):
    script.main(["--smoke", "--out", str(tmp_path), "--name", "smoke", "--warmup", "1", "--steps", "2",
                 "--profile-steps", "1"])
    record = json.loads((tmp_path / "smoke.json").read_text())
    assert record["name"] == "smoke" and len(record["step_seconds"]) == 2 and record["tokens_per_step"] == 2 * 64
    assert record["config"]["model"]["preset"] == "debug" and record["provenance"]["torch"]
    assert "# Step profile `smoke` (cpu)" in (tmp_path / "smoke.md").read_text()


def test_compute_stream_gaps(script):
    def device(name, ts, dur, stream, cat="kernel"):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}
    trace = [device("a", 0, 100, 7), device("b", 150, 100, 7), device("c", 400, 100, 7),  # gaps of 50 and 150 us
             device("Memcpy HtoD", 260, 100, 20, cat="gpu_memcpy"),  # during the second gap: 100 of its 150 us
             device("small", 0, 10, 3), {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]
    gaps = script.compute_gaps(trace, steps=2)
    assert gaps["compute_stream"] == 7 and gaps["gaps_per_step"] == 1
    assert gaps["idle_s_per_step"] == pytest.approx(100e-6)
    assert gaps["largest"][0] == {"us": 150, "before": "b", "after": "c", "other_streams_us": 100}
    assert gaps["largest"][1]["us"] == 50 and gaps["largest"][1]["other_streams_us"] == 0
    assert script.compute_gaps([], steps=1) == {"idle_s_per_step": 0.0, "largest": []}
