"""`optrush check`: equivalence checks a user runs on their own configuration.

    optrush check CONFIG [key=value ...] [--only packing resume] [--steps 6] [--json PATH]

    from optrush.check import run_checks
    report = run_checks(load_config("my.yaml"))      # report.passed, report.rows, report.write(path)

Every check takes the user's real config (model, tokenizer, data pipeline, every optimization switched on) and
runs a short seeded experiment comparing the optimized path with a plain reference *on the same batches and the
same initial weights*. Nothing the user chose is shrunk except the number of steps. Groups (`GROUPS`, run in
this order; `--only` picks some):

| group        | compares                                                                      | module        |
|--------------|-------------------------------------------------------------------------------|---------------|
| data         | trained EOS at every end, pad != EOS, padding never trained, loss mask        | data.py       |
| truncation   | records longer than data.max_length vs what the data report says it cut      | data.py       |
| numerics     | finite non-zero loss, finite gradients, a gradient on every trainable tensor  | numerics.py   |
| packing      | packed rows (document_ids) vs one document per padded row: loss, gradients   | equivalence.py|
| accumulation | the loop's gradient accumulation vs one batch of all the rows                 | equivalence.py|
| kernels      | each switched-on attention backend / fused kernel / checkpointing / compile   | equivalence.py|
|              | vs the plain model (and all of them together), ignored labels present        |               |
| precision    | loss over `--steps` optimizer steps vs the same run in fp32                   | equivalence.py|
| peft         | a zero-init adapter leaves the logits unchanged; a quantized base (QLoRA)     | runner.py     |
|              | dequantizes within its format's bound everywhere, and its forward equals the  |               |
|              | LoRA forward over the dequantized weights                                     |               |
| resume       | k steps + checkpoint + restore into fresh objects + k steps vs 2k straight:   | resume.py     |
|              | batch order, losses, weights                                                  |               |
| multi_gpu    | with a parallel.strategy: `--steps` steps on 2 ranks (x context.degree) via   | multi_gpu.py  |
|              | torchrun vs one process with grad_accum x2 (the same global batch): losses    |               |
|              | and gradient norms (bf16 tolerances under parallel.reduce_dtype=bf16)         |               |

The fast subset (`FAST`: data, numerics, packing, accumulation) runs before training when `train.verify=true`.

Tolerances (relative differences, `harness.TOLERANCES`; the same precision runs on both sides of a comparison,
except the precision row, which is against fp32):

| precision               | loss (1 step) | gradients (L2, all params) | loss drift over N steps |
|-------------------------|---------------|----------------------------|-------------------------|
| fp32 (CPU, or tf32=off) | 1e-5          | 1e-4                       | (reference)             |
| fp32 + TF32 on CUDA     | 2e-3          | 2e-2                       | (reference)             |
| bf16_mixed              | 1e-2          | 5e-2                       | 3e-2                    |
| bf16_pure               | 2e-2          | 1e-1                       | 5e-2                    |
| fp8                     | 3e-2          | 1.5e-1                     | 5e-2                    |
| fp8_pure                | 3e-2          | 1.5e-1                     | 5e-2                    |

Why these: fp32 paths that are mathematically equal differ only by summation order, about 1e-7 relative per op,
so 1e-5 on a loss (1e-4 on a gradient norm, which sums millions of products) leaves two orders of margin while a
real fault (a document seeing its neighbour, a 1% loss scale, a per-micro-batch mean) is 1e-3 or more. TF32 keeps
10 mantissa bits (~5e-4 per matmul); bf16 keeps 8 (~4e-3), compounded over layers; pure bf16 also rounds weights
and gradients; fp8 matmuls keep 3 mantissa bits with per-tensor scaling. Counts (missing EOS, trained padding,
batches in another order, dead parameters) must be exactly 0. Training amplifies rounding, the more so at a
high learning rate (measured on an H100, Llama-3.2-1B shape, QLoRA, 6 steps: bf16_mixed drifted 1.2% from fp32
at lr 2e-4 and 6.6% at lr 3e-3, with step 1 equal to 5e-5): a drift row that fails while step 1 agrees says so. Resume is compared with the one-step loss bound
(bitwise equal on CPU fp32). A failed row names the override that turns the optimization off
(`switch_to_turn_off`); rows that cannot apply to the config are reported "n/a" with the reason, never passed.
"""
from optrush.check.harness import TOLERANCES
from optrush.check.report import CheckReport, CheckResult, Tolerance
from optrush.check.runner import FAST, GROUPS, run_checks, run_fast_checks

__all__ = ["CheckReport", "CheckResult", "FAST", "GROUPS", "TOLERANCES", "Tolerance", "run_checks",
           "run_fast_checks"]
