"""Resume == uninterrupted: train 2k steps straight; train k steps, save a checkpoint with the real
`CheckpointManager`, build everything afresh, `restore` it and train k more; then compare the batch order, the
losses and the final weights of the two runs.
"""
from __future__ import annotations

import shutil

from optrush.check.harness import CheckContext, Run, relative, weights_difference
from optrush.check.report import CheckResult, compare
from optrush.train.checkpoint import CheckpointManager, restore


def check_resume(ctx: CheckContext, *, steps: int) -> list[CheckResult]:
    cfg = ctx.cfg
    k = max(1, steps // 2)
    straight = Run(ctx, cfg)
    for _ in range(2 * k):
        straight.step()

    first = Run(ctx, cfg)
    for _ in range(k):
        first.step()
    checkpoints = CheckpointManager(ctx.workdir / "resume", keep_last=1)
    path = checkpoints.save(state=first.state, **first.live())
    del first
    try:
        resumed = Run(ctx, cfg)  # fresh model, optimizer, scheduler and loader: everything must come from disk
        resumed.state = restore(path, **resumed.live())
        for _ in range(k):
            resumed.step()
    finally:
        shutil.rmtree(ctx.workdir / "resume", ignore_errors=True)

    switch = "checkpoint.resume=never"
    detail = f"{k} steps, checkpoint, {k} more vs {2 * k} straight"
    order = sum(a != b for a, b in zip(resumed.order, straight.order[k:]))
    losses = max(relative(a, b) for a, b in zip(resumed.state.losses, straight.state.losses))
    return [compare("resume: batch order", order, 0, switch=switch,
                    detail=f"{order} of {k} resumed steps trained other batches"),
            compare("resume: losses", losses, ctx.tolerance.loss, switch=switch, detail=detail),
            compare("resume: weights", weights_difference(resumed.model, straight.model), ctx.tolerance.loss,
                    switch=switch, detail=detail)]
