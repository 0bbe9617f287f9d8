"""Provenance record: which code, software and hardware produced a run or a benchmark number.

    from optrush.bench.provenance import provenance
    summary["provenance"] = provenance()

Holds the optrush git commit (and whether the working tree had uncommitted changes), Python / torch /
transformers / CUDA / cuDNN / driver versions, the device names and a UTC timestamp. It deliberately holds no
host name, user name, paths or git remote (which can embed credentials), so records can be published as they are.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent


def provenance() -> dict:
    """A JSON-serialisable description of this process's code, software and hardware."""
    import torch  # here, so that writing reports (`provenance_line`) does not load torch

    cuda = torch.cuda.is_available()
    sha = git_output("rev-parse", "HEAD")
    return {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha,
        "git_dirty": None if sha is None else bool(git_output("status", "--porcelain", "--untracked-files=no")),
        "optrush": package_version("optrush"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nvidia_driver": nvidia_driver() if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def provenance_line(p: dict, device: str | None = None) -> str:
    """The markdown bullet that says where and with what a result was measured."""
    device = device or ", ".join(p["devices"]) or "CPU"
    return (f"- device: {device}; torch {p['torch']}, CUDA {p['cuda']}, driver {p['nvidia_driver']}, "
            f"Python {p['python']}, transformers {p['transformers']}; optrush {p['git_sha'] or p['optrush'] or 'unknown'}"
            f"{' (uncommitted changes)' if p['git_dirty'] else ''}; measured {p['timestamp_utc']}")


def write_result(record: dict, markdown: str, *, out: str | Path, name: str) -> None:
    """A benchmark's result as `<out>/<name>.json` (the record, provenance included) and `.md` (its table)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")


def git_output(*args: str) -> str | None:
    """Output of a git command run in optrush's source tree, or None when that is not a git checkout (an
    installed wheel), git is missing, or the command fails (e.g. no commit yet)."""
    try:
        result = subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    """The NVIDIA driver version as reported by nvidia-smi (torch does not expose it), or None without it."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None
