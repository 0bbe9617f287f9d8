"""Writing an fp32 update into a bf16 weight without losing it: plain rounding, Kahan compensation, stochastic rounding.

    new = p.float() - lr * update                          # the exact new value, in fp32
    write_param_(p, new, state, rule="kahan")             # state: the optimizer's per-parameter dict

With pure bf16 weights (precision.mode=bf16_pure or fp8_pure) an update smaller than half a bf16 ulp of the weight
(8 bits of mantissa: |update| < |w| / 512) rounds away entirely, so late-training updates at small learning rates
are lost.

- plain: round to nearest (what `p.add_` on a bf16 tensor does).
- kahan: keep the rounding residue `new - bf16(new)` in a bf16 buffer (`state["kahan"]`, 2 bytes per parameter)
  and add it to the next update, so sub-ulp updates accumulate until they move the weight (Kahan summation;
  "Revisiting BFloat16 Training", arXiv:2010.06192).
- stochastic: round up with probability equal to the fraction of an ulp cut off, so the expected written value
  equals `new` (unbiased); no extra memory (arXiv:2010.06192, Gupta et al. arXiv:1502.02551).

fp32 weights (every other precision mode) are written as they are whatever the rule. Optimizers of optrush.optim
that compute their own update (adamw with bf16 states or a bf16 rule, lion, muon, schedule_free_adamw) end their
step with `write_param_`; `state_buffer` makes their moment buffers in `optim.state_dtype`.
"""
from __future__ import annotations

from itertools import chain

import torch

BF16_RULES = ("plain", "kahan", "stochastic")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down at random, with E[result] = x: add 16 random bits below the bf16
    mantissa, then truncate them. Uses the global torch RNG (restored on resume, so runs stay repeatable)."""
    bits = x.float().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32)
    # -65536 == 0xFFFF0000: keep sign, exponent and the 7 bf16 mantissa bits; the float is then exactly a bf16
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def write_param_(p: torch.Tensor, new: torch.Tensor, state: dict, *, rule: str) -> None:
    """Store the fp32 value `new` into parameter `p` following `rule` (see the module docstring)."""
    if p.dtype != torch.bfloat16 or rule == "plain":
        p.copy_(new)
    elif rule == "stochastic":
        p.copy_(stochastic_round(new))
    elif rule == "kahan":
        comp = state.get("kahan")
        if comp is None:
            comp = state["kahan"] = torch.zeros_like(p)
        target = new + comp.float()
        p.copy_(target)
        comp.copy_(target - p.float())
    else:
        raise ValueError(f"optim.bf16_update={rule!r} is not a known rule; use one of {', '.join(BF16_RULES)}")


def state_buffer(p: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A zero optimizer-state buffer shaped like `p`, in `dtype` (None: the parameter's own dtype)."""
    return torch.zeros_like(p, dtype=dtype or p.dtype, memory_format=torch.preserve_format)


class MixedDtypeOptimizer(torch.optim.Optimizer):
    """Base of optrush's own optimizers: state buffers in `state_dtype` (None: the parameter's), the new weight
    computed in fp32 by `new_value` and written back under the `bf16_update` rule. `load_state_dict` keeps every
    state tensor in the dtype it was saved in: torch's casts floating-point state to the parameter's dtype, which
    would turn the fp32 moments of bf16 weights into bf16 (and bf16 moments of fp32 weights into fp32) on resume."""

    def __init__(self, params, defaults: dict, *, state_dtype: torch.dtype | None, bf16_update: str):
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.bf16_update = bf16_update

    def new_value(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Advance `state` by one step for `p` (whose .grad is set) and return the new weight in fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    write_param_(p, self.new_value(p, self.state[p], group), self.state[p], rule=self.bf16_update)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for saved_id, saved in state_dict["state"].items():
            p = params[saved_id]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)
