"""What every check shares: the user's data and model built exactly as `optrush train` builds them, gradients of
one batch, and a short training run that mirrors the loop's step.

    ctx = prepare(cfg)                                   # device, tokenizer, examples, data report, tolerances
    model = model_for(ctx, cfg)                          # build + apply_optimizations, seeded, train mode
    loss, grads = loss_and_grads(ctx, model, batches, autocast=precision_context(cfg, ctx.device))
    run = Run(ctx, cfg); run.step()                      # one optimizer step of the training loop

Models are built one at a time and their gradients copied to CPU before the next one is built, so a check never
holds two copies of the user's model on the accelerator.
"""
from __future__ import annotations

import contextlib
import copy
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optrush.check.report import Tolerance
from optrush.config import Config
from optrush.config.schema import ActivationsConfig, CompileConfig, ContextConfig, KernelsConfig, ParallelConfig
from optrush.data.batch import Batch
from optrush.data.dataset import DataReport, build_datasets
from optrush.data.formats import Example
from optrush.data.tokenizer import load_config_tokenizer
from optrush.objectives import build_objective
from optrush.optim.optimizer import build_optimizer
from optrush.optim.schedule import build_scheduler
from optrush.train import loop
from optrush.train.checkpoint import TrainState
from optrush.train.optimizations import apply_optimizations

# See the table in optrush/check/__init__.py for where these come from.
TOLERANCES = {
    "fp32": Tolerance(loss=1e-5, grad=1e-4, drift=1e-4),
    "fp32_tf32": Tolerance(loss=2e-3, grad=2e-2, drift=5e-3),
    "bf16_mixed": Tolerance(loss=1e-2, grad=5e-2, drift=3e-2),
    "bf16_pure": Tolerance(loss=2e-2, grad=1e-1, drift=5e-2),
    "fp8": Tolerance(loss=3e-2, grad=1.5e-1, drift=5e-2),
    "fp8_pure": Tolerance(loss=3e-2, grad=1.5e-1, drift=5e-2),
}


def tolerance_key(cfg: Config, device: torch.device) -> str:
    """The row of TOLERANCES for this run: TF32 matmuls only exist on CUDA."""
    if cfg.precision.mode == "fp32" and cfg.precision.tf32 and device.type == "cuda":
        return "fp32_tf32"
    return cfg.precision.mode


@dataclass(kw_only=True)
class CheckContext:
    cfg: Config
    device: torch.device
    tokenizer: object
    examples: list[Example]
    data_report: DataReport
    tolerance: Tolerance
    precision: str
    workdir: Path
    """Scratch space for checkpoints written by the resume check (`<output_dir>/check`)."""


def prepare(cfg: Config) -> CheckContext:
    """Tokenizer, training examples and data report exactly as `optrush.train.train` makes them."""
    device = loop.resolve_device(cfg.train.device)
    tokenizer = load_config_tokenizer(cfg)
    examples, _, report = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    key = tolerance_key(cfg, device)
    return CheckContext(cfg=cfg, device=device, tokenizer=tokenizer, examples=examples, data_report=report,
                        tolerance=TOLERANCES[key], precision=key, workdir=Path(cfg.output_dir) / "check")


def plain_config(cfg: Config) -> Config:
    """`cfg` with every speed switch at its reference setting (same model, data, precision and loss)."""
    plain = copy.deepcopy(cfg)
    plain.model.attention = "sdpa"
    plain.kernels = KernelsConfig(z_loss=cfg.kernels.z_loss, loss_chunk_tokens=cfg.kernels.loss_chunk_tokens)
    plain.compile = CompileConfig()
    plain.activations = ActivationsConfig()
    return plain


def model_for(ctx: CheckContext, cfg: Config) -> nn.Module:
    """The model `cfg` trains (same seed, so every variant starts from the same weights), in train mode, in this
    one process (the multi_gpu row compares the parallel run with it)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel, cfg.context = ParallelConfig(), ContextConfig()
    torch.manual_seed(cfg.train.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the transforms' log lines would drown the table
        model = loop.build(cfg, vocab_size=len(ctx.tokenizer), device=ctx.device)
        model = apply_optimizations(model, cfg)
    model.train()
    return model


def loader_for(ctx: CheckContext, cfg: Config):
    return loop.make_loader(ctx.examples, cfg, ctx.tokenizer.pad_token_id, shuffle=cfg.data.shuffle)


def loss_and_grads(ctx: CheckContext, model: nn.Module, batches: list[Batch], *,
                   autocast) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference step: summed loss over `batches` divided by their total trained tokens, and every gradient
    (fp32, on CPU). Written out here rather than calling the loop, so a bug in the loop cannot hide in both."""
    objective = build_objective(ctx.cfg.objective)
    units = sum(objective.units(b) for b in batches)
    total = 0.0
    for batch in batches:
        with autocast:
            loss_sum, _ = objective(model, batch.to(ctx.device))
        (loss_sum / units).backward()
        total += loss_sum.item()
    return total / units, grads_of(model)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def grad_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters together; a gradient missing on one side counts in full."""
    diff, ref = 0.0, 0.0
    for name in reference.keys() | grads.keys():
        a, b = grads.get(name), reference.get(name)
        if b is not None:
            ref += float(b.double().square().sum())
        if a is None or b is None:
            diff += float((a if a is not None else b).double().square().sum())
        else:
            diff += float((a.double() - b.double()).square().sum())
    return (diff ** 0.5) / max(ref ** 0.5, 1e-30)


def weights_difference(model: nn.Module, reference: nn.Module) -> float:
    """||w - w_ref|| / ||w_ref|| over all floating-point parameters together (not a quantized base's integer
    codes, whose magnitudes are no weights)."""
    def weights(m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu() for n, p in m.named_parameters() if p.is_floating_point()}

    return grad_difference(weights(model), weights(reference))


def fingerprint(batches: list[Batch]) -> int:
    """A checksum of the tokens and labels of one optimizer step's micro-batches (for batch-order checks)."""
    crc = 0
    for batch in batches:
        crc = zlib.crc32(batch.input_ids.numpy().tobytes(), crc)
        crc = zlib.crc32(batch.labels.numpy().tobytes(), crc)
    return crc


class Run:
    """A short training run: the training loop's setup and step, without logging, eval or saving."""

    def __init__(self, ctx: CheckContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.model = model_for(ctx, cfg)
        self.objective = build_objective(cfg.objective)
        self.optimizer = build_optimizer(self.model, cfg.optim, lr=cfg.train.lr, device_type=ctx.device.type,
                                         lora_plus_ratio=cfg.peft.lora_plus_ratio)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = loader_for(ctx, cfg)
        self.autocast = loop.precision_context(cfg, ctx.device)
        self.state = TrainState()
        self.order: list[int] = []
        """Fingerprint of each step's micro-batches, in the order they were trained."""

    def step(self) -> float:
        micro_batches = [next(self.loader) for _ in range(self.cfg.train.grad_accum)]
        self.order.append(fingerprint(micro_batches))
        loss_sum, units = loop.accumulate_gradients(self.model, self.objective, micro_batches,
                                                    device=self.ctx.device, autocast=self.autocast)
        loop.clip_gradients(self.model, self.cfg.train.max_grad_norm, self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.losses.append(float(loss_sum) / max(units, 1))
        return self.state.losses[-1]

    def losses(self, steps: int) -> list[float]:
        return [self.step() for _ in range(steps)]

    def live(self) -> dict:
        """The objects `optrush.train.checkpoint` saves and restores."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "loader": self.loader}
