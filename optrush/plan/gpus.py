"""The GPUs the planner knows: memory, dense peak FLOP/s, memory and interconnect bandwidth, from the datasheets.

    gpu, count = parse_gpus("2xH200")          # (GPU(name="H200", ...), 2)
    gpu.memory_gib, gpu.bf16_flops

`memory_gib` is what `torch.cuda.get_device_properties(i).total_memory` reports (GiB), not the marketing GB.
FLOP/s are dense (no 2:4 sparsity) tensor-core peaks; `fp8_flops` is None where the GPU has no FP8 tensor cores.
The training loop's MFU reads its peaks from this table too (`optrush.train.metrics.peak_flops_of`), so predicted
and measured MFU share one denominator.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class GPU:
    name: str
    memory_gib: float
    bf16_flops: float
    tf32_flops: float
    fp8_flops: float | None
    hbm_bytes_per_s: float
    """Device memory bandwidth (what dequantization and offload copies on the GPU side stream through)."""
    link_bytes_per_s: float
    """GPU-to-GPU bandwidth per direction (NVLink where the part has it, else PCIe)."""


GPUS: dict[str, GPU] = {g.name: g for g in [
    # https://www.nvidia.com/en-us/data-center/h100/ (SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s, NVLink 900 GB/s)
    GPU(name="H100", memory_gib=79.2, bf16_flops=989e12, tf32_flops=494e12, fp8_flops=1979e12,
        hbm_bytes_per_s=3.35e12, link_bytes_per_s=450e9),
    GPU(name="H100-PCIe", memory_gib=79.2, bf16_flops=756e12, tf32_flops=378e12, fp8_flops=1513e12,
        hbm_bytes_per_s=2.0e12, link_bytes_per_s=64e9),
    # https://www.nvidia.com/en-us/data-center/h200/ (same compute as H100 SXM, 141 GB at 4.8 TB/s)
    GPU(name="H200", memory_gib=139.8, bf16_flops=989e12, tf32_flops=494e12, fp8_flops=1979e12,
        hbm_bytes_per_s=4.8e12, link_bytes_per_s=450e9),
    # https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOP/s bf16 dense; NVLink 600 GB/s)
    GPU(name="A100", memory_gib=79.1, bf16_flops=312e12, tf32_flops=156e12, fp8_flops=None,
        hbm_bytes_per_s=2.04e12, link_bytes_per_s=300e9),
    GPU(name="A100-40GB", memory_gib=39.4, bf16_flops=312e12, tf32_flops=156e12, fp8_flops=None,
        hbm_bytes_per_s=1.555e12, link_bytes_per_s=300e9),
    # https://www.nvidia.com/en-us/data-center/l40s/
    GPU(name="L40S", memory_gib=44.4, bf16_flops=362e12, tf32_flops=183e12, fp8_flops=733e12,
        hbm_bytes_per_s=864e9, link_bytes_per_s=32e9),
    # https://www.nvidia.com/en-us/data-center/l4/ (121 TFLOP/s bf16 dense, 300 GB/s)
    GPU(name="L4", memory_gib=22.0, bf16_flops=121e12, tf32_flops=60e12, fp8_flops=242e12,
        hbm_bytes_per_s=300e9, link_bytes_per_s=32e9),
    # RTX 4090 (Ada whitepaper: 165 TFLOP/s bf16 with fp32 accumulation, dense; 1.0 TB/s GDDR6X)
    GPU(name="4090", memory_gib=23.6, bf16_flops=165e12, tf32_flops=82.6e12, fp8_flops=330e12,
        hbm_bytes_per_s=1.008e12, link_bytes_per_s=32e9),
    # RTX 3090 (Ampere GA102 whitepaper: 71 TFLOP/s bf16 with fp32 accumulation, dense; 936 GB/s)
    GPU(name="3090", memory_gib=23.6, bf16_flops=71e12, tf32_flops=35.6e12, fp8_flops=None,
        hbm_bytes_per_s=936e9, link_bytes_per_s=32e9),
]}


def parse_gpus(spec: str) -> tuple[GPU, int]:
    """`"1xH100"`, `"2xH200"`, `"H100"` (one) or `"8xA100-40GB"` -> (GPU, count); ValueError naming the known GPUs."""
    by_lower = {name.lower(): gpu for name, gpu in GPUS.items()}
    # "2x" would read as a GPU named "2x", "2" as one named "2" (4090 and 3090 are names): say the name is missing
    count_only = re.fullmatch(r"\s*(\d*)\s*[xX*]?\s*", spec)
    if count_only and spec.strip().lower() not in by_lower:
        raise ValueError(f"--gpus {spec!r}: the GPU name is missing; expected COUNTxNAME, e.g. "
                         f"{count_only.group(1) or 1}xH100 (known: {', '.join(GPUS)})")
    match = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9-]+)\s*", spec)
    if match is None:
        raise ValueError(f"--gpus {spec!r}: expected COUNTxNAME, e.g. 1xH100 or 2xH200")
    count = int(match.group(1) or 1)
    name = match.group(2).lower().removeprefix("rtx")
    if name not in by_lower:
        close = difflib.get_close_matches(name, by_lower, n=1)
        hint = f" Did you mean {by_lower[close[0]].name}?" if close else ""
        raise ValueError(f"--gpus {spec!r}: unknown GPU {match.group(2)!r}.{hint} Known: {', '.join(GPUS)}")
    if count < 1:
        raise ValueError(f"--gpus {spec!r}: the count must be >= 1")
    return by_lower[name], count


def gpu_from_device_name(device: str) -> GPU | None:
    """The table entry for a `torch.cuda.get_device_name()` string ("NVIDIA H100 80GB HBM3"), or None."""
    lower = device.lower()
    if "h100" in lower and "pcie" in lower:
        return GPUS["H100-PCIe"]
    if "a100" in lower and "40gb" in lower:
        return GPUS["A100-40GB"]
    for name, gpu in GPUS.items():
        if name.lower() in lower:
            return gpu
    return None
