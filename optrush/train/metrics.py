"""Run metrics: a JSONL log, a live progress bar (or plain lines), TensorBoard, the end-of-run summary, and the
throughput / MFU / memory numbers that go into them.

    throughput = Throughput()
    with MetricsLogger(output_dir=out, cfg=cfg.logging, total_steps=cfg.train.max_steps, start_step=step) as log:
        for step in ...:
            throughput.update(tokens=n, seconds=dt)
            log.log(step, {"loss": loss, "lr": lr, "tokens_per_s": throughput.tokens_per_s,
                           "mfu": mfu(throughput.tokens_per_s, flops_per_token, peak), "peak_mem_gib": ...})
        log.summary({"provenance": provenance()})

Every `log` call appends one JSON object per line to `<output_dir>/metrics.jsonl` (`{"step": .., "elapsed_s": ..,
**metrics}`); the caller decides the cadence (`logging.every`). A fresh run (`start_step=0`) starts a new file; a
resumed run keeps the rows up to the step it resumes from and continues the file, dropping the rows the
interrupted run wrote after that checkpoint (those steps are trained again), so every step appears once.
TensorBoard gets the same treatment through its `purge_step`. Known keys (see `FORMATS`) are also shown: in a rich
progress bar when `logging.progress` is on and stdout is a terminal, otherwise as one short text line per call, so
CI logs show the loss falling. Text metrics (the `sample_<i>` continuations of `train.sample_prompts`) are printed
below their step's line, after their prompt.
"""
from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from optrush.atomic import written_whole
from optrush.config.schema import FLOAT8_MODES, LoggingConfig


def matmul_peak_flops(device: torch.device, mode: str) -> float | None:
    """Dense peak FLOP/s of `device` for the precision.mode its matmuls run in: the FP8 peak for float8 modes (issue
    #5's MFU definition: 1979 TFLOP/s on an H100 SXM, twice bf16), TF32 for fp32, bf16 otherwise."""
    dtype = torch.float8_e4m3fn if mode in FLOAT8_MODES else torch.float32 if mode == "fp32" else torch.bfloat16
    return device_peak_flops(device, dtype)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense matmul FLOP/s of `device` for `dtype` compute, or None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)


def peak_flops_of(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak of the GPU called `device_name` (as torch names it) from the planner's datasheet table
    (optrush.plan.gpus), so measured and predicted MFU share one denominator. float32 maps to the TF32 peak:
    optrush runs fp32 matmuls as TF32 unless `precision.tf32=false`."""
    from optrush.plan.gpus import gpu_from_device_name

    gpu = gpu_from_device_name(device_name)
    if gpu is None:
        return None
    return {torch.bfloat16: gpu.bf16_flops, torch.float16: gpu.bf16_flops, torch.float32: gpu.tf32_flops,
            torch.float8_e4m3fn: gpu.fp8_flops}.get(dtype)


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.4 = 40 %): achieved model FLOP/s over the device peak."""
    if tokens_per_s is None or peak_flops is None:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def model_params(model: torch.nn.Module) -> int:
    """Weights of the model, those stored quantized under QLoRA adapters counted by their shape (not by the
    integer codes that store them, which `num_params` counts as parameters)."""
    from optrush.peft.quant import QuantizedWeight

    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    stored = sum(p.numel() for m in quantized for p in m.parameters())
    return model.num_params() - stored + sum(m.shape.numel() for m in quantized)


def trainable_params(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates: the adapters (and a reward head) under PEFT, else all of them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """`model.flops_per_token`, counting quantized base weights too: they are multiplied like any other."""
    return model.flops_per_token(seq_len) + 6 * (model_params(model) - model.num_params())


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far in GiB: CUDA tensors allocated by PyTorch, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**30 if sys.platform == "darwin" else max_rss / 2**20  # macOS reports bytes, Linux KiB


class Throughput:
    """Tokens per second over the last `window` steps. The first step is dropped: it includes warm-up, CUDA
    context creation and compilation, and would understate a short run's speed. Time each step yourself (after a
    `torch.cuda.synchronize()` on GPU, or the time goes to whichever later step waits on the queue)."""

    def __init__(self, *, window: int = 20):
        self.steps: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.warmed_up = False

    def update(self, *, tokens: int, seconds: float, real_tokens: int | None = None) -> None:
        """Record one finished step: `tokens` processed (padding included), `real_tokens` of them not padding
        (defaults to `tokens`), in `seconds`."""
        if not self.warmed_up:
            self.warmed_up = True
            return
        self.steps.append((tokens, tokens if real_tokens is None else real_tokens, seconds))

    @property
    def tokens_per_s(self) -> float | None:
        """Processed tokens (padding included) per second; None until a step after the first."""
        return self._rate(0)

    @property
    def real_tokens_per_s(self) -> float | None:
        """Non-padding tokens per second; None until a step after the first."""
        return self._rate(1)

    def _rate(self, column: int) -> float | None:
        seconds = sum(step[2] for step in self.steps)
        if seconds <= 0:
            return None
        return sum(step[column] for step in self.steps) / seconds


class LogWindow:
    """The training numbers of the steps since the last log line, so that a line's loss and grad norm cover the
    same steps as the objective's own metrics (`pop_metrics`, averaged since its last call): their means over those
    steps, and the sum of the units the loss was averaged over, as `trained_<units>` (tokens, pairs or
    completions)."""

    def __init__(self, units: str):
        self.units_key = f"trained_{units}"
        self._start()

    def _start(self) -> None:
        self.steps, self.loss_sum, self.grad_norm_sum, self.units = 0, 0.0, 0.0, 0

    def add(self, *, loss: float, grad_norm: float, units: int) -> None:
        """One finished optimizer step: its loss (a mean over its `units`) and its grad norm."""
        self.steps += 1
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.units += units

    def pop(self) -> dict[str, float | int]:
        """The window's numbers for the log (`loss`, `grad_norm`, `trained_<units>`); the next window starts."""
        record = {"loss": self.loss_sum / self.steps, "grad_norm": self.grad_norm_sum / self.steps,
                  self.units_key: self.units}
        self._start()
        return record


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _with_eval(formats: dict[str, Callable[[Any], str]]) -> dict[str, tuple[str, Callable[[Any], str]]]:
    """Each metric and its `eval_` counterpart, both shown under their metrics.jsonl name."""
    return {name: (name, fmt) for key, fmt in formats.items() for name in (key, f"eval_{key}")}


# The metrics shown on screen, in this order, as (label, format); every key still goes to the JSONL file.
FORMATS: dict[str, tuple[str, Callable[[Any], str]]] = {
    **_with_eval({"loss": lambda v: f"{v:.4f}"}),
    "eval_ppl": ("eval_ppl", lambda v: f"{v:.2f}"),
    # the objectives' own (optrush.objectives): reward model and DPO ranking, GRPO's reward and KL
    **_with_eval({"accuracy": lambda v: f"{v:.3f}", "reward_gap": lambda v: f"{v:.3f}",
                  "reward_margin": lambda v: f"{v:.3f}", "reward": lambda v: f"{v:.3f}",
                  "kl": lambda v: f"{v:.4f}"}),
    "lr": ("lr", lambda v: f"{v:.2e}"),
    "grad_norm": ("grad_norm", lambda v: f"{v:.3f}"),
    "tokens_per_s": ("tok/s", _si),
    "mfu": ("mfu", lambda v: f"{100 * v:.1f}%"),
    "peak_mem_gib": ("mem", lambda v: f"{v:.2f} GiB"),
    "sample_repetition": ("sample repetition", lambda v: f"{v:.2f}"),
    "sample_parses": ("parses", lambda v: f"{v:.2f}"),
    "sample_ingredient_use": ("ingredient use", lambda v: f"{v:.2f}"),
}
SAMPLE_KEY = re.compile(r"^sample_(\d+)$")


def format_metrics(metrics: dict[str, Any]) -> str:
    return " | ".join(f"{label} {fmt(metrics[key])}" for key, (label, fmt) in FORMATS.items()
                      if metrics.get(key) is not None)


def format_texts(metrics: dict[str, Any], prompts: Sequence[str]) -> list[str]:
    """The text metrics as indented blocks, one per key; a sample continuation is shown after its prompt."""
    blocks = []
    for key, value in metrics.items():
        if not isinstance(value, str):
            continue
        sample = SAMPLE_KEY.match(key)
        if sample and int(sample.group(1)) < len(prompts):
            label, text = f"sample {sample.group(1)}", prompts[int(sample.group(1))] + value
        else:
            label, text = key, value
        lines = text.rstrip().splitlines() or [""]
        blocks.append("\n".join([f"  {label}: {lines[0]}", *(f"    {line}" for line in lines[1:])]))
    return blocks


def open_metrics_file(path: Path, start_step: int):
    """`path` opened for appending: emptied for a fresh run (start_step 0), else cut to the rows up to
    `start_step` (a row half-written when the interrupted run was killed is dropped too)."""
    if start_step == 0 or not path.is_file():
        return open(path, "w", encoding="utf-8")
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["step"] <= start_step]
    with written_whole(path) as partial:  # a crash here leaves the old file whole
        partial.write_text("".join(kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")


class MetricsLogger:
    """Writes `metrics.jsonl` (and TensorBoard events), shows progress, and writes `summary.json` at the end.
    With `enabled=False` (non-zero ranks) every method does nothing and nothing is created."""

    def __init__(self, *, output_dir: str | Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0,
                 sample_prompts: Sequence[str] = (), enabled: bool = True):
        """`start_step`: the step a resumed run continues from (0: a fresh run); `sample_prompts`: the prompts of
        the `sample_<i>` texts (train.sample_prompts), shown before them on the console."""
        self.output_dir = Path(output_dir)
        self.total_steps = total_steps
        self.sample_prompts = list(sample_prompts)
        self.enabled = enabled
        self.started = time.perf_counter()
        self.last_step = start_step
        self.losses: list[float] = []
        self.tokens_per_s: list[float] = []
        self.peak_mem_gib: float | None = None
        self.file = None
        self.tensorboard = None
        self.progress: Progress | None = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open_metrics_file(self.output_dir / "metrics.jsonl", start_step)
        if cfg.tensorboard:
            self.tensorboard = tensorboard_writer(self.output_dir / "tensorboard", purge_step=start_step + 1)
        if cfg.progress and sys.stdout.isatty():
            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=20),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()
        self.console = self.progress.console if self.progress is not None else Console(highlight=False)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` (Python numbers, strings or None) for optimizer step `step`."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                raise TypeError(f"metric {key!r} is a tensor; log Python numbers (call .item() once per log step)")
        self.last_step = step
        self._remember(metrics)
        record = {"step": step, "elapsed_s": round(time.perf_counter() - self.started, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)
        text = format_metrics(metrics)
        texts = format_texts(metrics, self.sample_prompts)
        if self.progress is None:
            width = len(str(self.total_steps))
            print("\n".join([f"step {step:>{width}}/{self.total_steps} | {text}", *texts]), flush=True)
            return
        # evals and samples are rare: keep them on screen above the bar
        if texts or any(key.startswith("eval_") for key in metrics):
            self.console.print("\n".join([f"step {step}/{self.total_steps} | {text}", *texts]), highlight=False,
                               markup=False)
        else:
            self.progress.update(self.task, completed=step, stats=text)

    def note(self, text: str) -> None:
        """Print an event line (a checkpoint written, the final model saved), above the progress bar when shown."""
        if not self.enabled:
            return
        if self.progress is None:
            print(text, flush=True)  # not rich's console: it would wrap a long path at its 80-column default
        else:
            self.console.print(text, highlight=False, markup=False)

    def _remember(self, metrics: dict[str, Any]) -> None:
        if metrics.get("loss") is not None:
            self.losses.append(metrics["loss"])
        if metrics.get("tokens_per_s") is not None:
            self.tokens_per_s.append(metrics["tokens_per_s"])
        if metrics.get("peak_mem_gib") is not None:
            self.peak_mem_gib = max(self.peak_mem_gib or 0.0, metrics["peak_mem_gib"])

    def summary(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print a table of the run and write `<output_dir>/summary.json`: steps, final/min loss, mean tokens/s,
        peak memory and time from what was logged, then `extra` (which wins on equal keys: `train` gives the final
        and min loss of its steps' own losses instead of the logged averages). Returns the record."""
        if not self.enabled:
            return {}
        record = {
            "steps": self.last_step,
            "final_loss": self.losses[-1] if self.losses else None,
            "min_loss": min(self.losses) if self.losses else None,
            "mean_tokens_per_s": sum(self.tokens_per_s) / len(self.tokens_per_s) if self.tokens_per_s else None,
            "peak_mem_gib": self.peak_mem_gib,
            "time_s": round(time.perf_counter() - self.started, 3),
            **(extra or {}),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self.console.print(summary_table(record))
        return record


def summary_table(record: dict[str, Any]) -> Table:
    """The scalar entries of a summary record (nested ones such as config or provenance stay in the JSON)."""
    table = Table(title="run summary", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in record.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}")
        elif isinstance(value, (int, str, bool)) or value is None:
            table.add_row(key, "n/a" if value is None else str(value))
    return table


def tensorboard_writer(log_dir: Path, *, purge_step: int):
    """`purge_step`: TensorBoard hides the events of earlier writers in `log_dir` from this step on (those of an
    earlier run in the same directory, or of steps a resumed run trains again)."""
    # Imported here: tensorboard is an optional dependency, needed only with logging.tensorboard=true.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or set logging.tensorboard=false)") from error
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
