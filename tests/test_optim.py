"""Optimizer parameter groups and kernel choice; learning-rate schedules and their resumable state."""
import math

import pytest
import torch
from torch import nn

from optrush.config.schema import OptimConfig, TrainConfig
from optrush.optim import build_optimizer, build_scheduler, lr_at


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.head = nn.Linear(4, 11, bias=False)

    def forward(self, input_ids, *, position_ids=None, document_ids=None, labels=None, reduction="mean"):
        return self.head(self.proj(self.norm(self.embed(input_ids))))


def test_groups_decay_matrices_only_and_skip_frozen():
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=1e-3, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.norm.weight), id(model.norm.bias), id(model.proj.bias)}
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3


def test_fused_flag_resolution():
    model = TinyLM()
    cpu = build_optimizer(model, OptimConfig(), lr=1e-3, device_type="cpu")
    assert not cpu.defaults["fused"] and cpu.defaults["foreach"]
    cpu_fused = build_optimizer(model, OptimConfig(fused=True), lr=1e-3, device_type="cpu")
    assert cpu_fused.defaults["fused"] and not cpu_fused.defaults["foreach"]
    # CUDA defaults to fused (built here on CPU tensors, which the fused kernel also supports).
    cuda = build_optimizer(model, OptimConfig(), lr=1e-3, device_type="cuda")
    assert cuda.defaults["fused"] and not cuda.defaults["foreach"]
    cuda_unfused = build_optimizer(model, OptimConfig(fused=False), lr=1e-3, device_type="cuda")
    assert not cuda_unfused.defaults["fused"] and cuda_unfused.defaults["foreach"]


def test_unknown_optimizer_and_no_trainable_params():
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        build_optimizer(TinyLM(), OptimConfig(name="sgd"), lr=1e-3, device_type="cpu")
    frozen = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig(), lr=1e-3, device_type="cpu")


def cfg(schedule, **kw):
    return TrainConfig(schedule=schedule, max_steps=100, warmup_steps=10, min_lr_ratio=0.1, **kw)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_warmup_is_linear_and_never_zero(schedule):
    c = cfg(schedule)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert all(0 < lr_at(s, c) <= 1 for s in range(101))


def test_schedule_values():
    assert lr_at(100, cfg("constant")) == 1.0 and lr_at(55, cfg("constant")) == 1.0
    assert lr_at(55, cfg("linear")) == pytest.approx(1 - 0.5 * 0.9)
    assert lr_at(55, cfg("cosine")) == pytest.approx(0.1 + 0.9 * 0.5)
    for schedule in ("linear", "cosine", "wsd"):
        assert lr_at(100, cfg(schedule)) == pytest.approx(0.1)
        assert lr_at(150, cfg(schedule)) == pytest.approx(0.1)
        values = [lr_at(s, cfg(schedule)) for s in range(10, 101)]
        assert all(a >= b for a, b in zip(values, values[1:])), schedule
    wsd = cfg("wsd", decay_fraction=0.2)
    assert [lr_at(s, wsd) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]  # plateau until the last 20 steps
    assert lr_at(90, wsd) == pytest.approx(1 - 0.5 * 0.9)
    no_warmup = TrainConfig(schedule="cosine", max_steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, no_warmup) == 1.0 and lr_at(10, no_warmup) == 0.0
    assert lr_at(5, no_warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="train.schedule='step'"):
        build_scheduler(build_optimizer(TinyLM(), OptimConfig(), lr=1e-3, device_type="cpu"), cfg("step"))


def test_scheduler_applies_multiplier_and_state_round_trips():
    torch.manual_seed(0)
    c = cfg("cosine")
    model = TinyLM()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=2e-3, device_type="cpu")
    sched = build_scheduler(opt, c)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * 0.1] * 2)
    for _ in range(37):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_at(37, c))
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    opt2 = build_optimizer(model, OptimConfig(weight_decay=0.1), lr=2e-3, device_type="cpu")
    sched2 = build_scheduler(opt2, c)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 37 and sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(20):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
