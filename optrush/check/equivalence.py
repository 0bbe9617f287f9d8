"""Equivalence checks: the optimized path against a plain reference on the same batches and the same weights.

- `check_packing`: the documents of the first packed micro-batch, packed (document-causal attention, positions
  restarting per document) vs one document per padded row; loss and gradients.
- `check_accumulation`: the loop's `accumulate_gradients` over micro-batches vs one batch holding all their rows.
- `check_kernels`: for each speed switch the config turns on (attention backend, fused loss, fused ops, fused
  dequantize, activation checkpointing, compile), the plain model plus that one transform vs the plain model,
  and all of them together, applied through `optrush.train.optimizations.apply_optimizations`, on a batch with
  ignored labels.
- `check_precision`: a short training run in the configured precision vs the same run in fp32 (loss drift).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

from optrush.check.harness import (CheckContext, Run, grad_difference, grads_of, loader_for, loss_and_grads,
                                   model_for, plain_config, relative)
from optrush.check.report import CheckResult, compare, not_applicable
from optrush.config import Config
from optrush.config.schema import CompileConfig
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.pack import collate
from optrush.objectives import build_objective
from optrush.train import loop


def check_packing(ctx: CheckContext) -> list[CheckResult]:
    cfg = ctx.cfg
    if cfg.data.packing == "none":
        return [not_applicable("packing: packed == unpacked", "data.packing=none: no row holds two documents")]
    loader = loader_for(ctx, cfg)
    # the first micro-batch where documents share a row (one full-length document per row checks nothing)
    shared = [i for i, micro in enumerate(loader.plan) if any(len(row) > 1 for row in micro)]
    if not shared:
        return [not_applicable("packing: packed == unpacked", "no packed row holds two documents (every document "
                               "is close to data.max_length)")]
    for _ in range(shared[0] + 1):
        packed = next(loader)
    documents = [ctx.examples[i] for row in loader.plan[shared[0]] for i in row]
    rows = cfg.train.micro_batch_size
    unpacked = [collate([[doc] for doc in documents[start:start + rows]], packed=False,
                        pad_id=ctx.tokenizer.pad_token_id, max_length=cfg.data.max_length)
                for start in range(0, len(documents), rows)]
    autocast = loop.precision_context(cfg, ctx.device)
    # The reference is the plain model (SDPA, eager: padded rows of changing length would only recompile); the
    # packed side runs the configured kernels eagerly (compiled == eager is the kernels rows' job).
    eager = copy.deepcopy(cfg)
    eager.compile = CompileConfig()
    ref_loss, ref_grads = loss_and_grads(ctx, model_for(ctx, plain_config(cfg)), unpacked, autocast=autocast)
    loss, grads = loss_and_grads(ctx, model_for(ctx, eager), [packed], autocast=autocast)
    detail = f"{len(documents)} documents in {packed.input_ids.shape[0]} packed rows"
    return [compare("packing: loss", relative(loss, ref_loss), ctx.tolerance.loss, switch="data.packing=none",
                    detail=detail),
            compare("packing: gradients", grad_difference(grads, ref_grads), ctx.tolerance.grad,
                    switch="data.packing=none", detail=detail)]


def check_accumulation(ctx: CheckContext) -> list[CheckResult]:
    """Two or more micro-batches (`train.grad_accum`, at least 2) through the loop vs all their rows at once."""
    cfg = ctx.cfg
    loader = loader_for(ctx, cfg)
    steps = max(cfg.train.grad_accum, 2)
    if loader.batches_per_epoch < steps:
        return [not_applicable("accumulation: == one large batch",
                               f"the data makes {loader.batches_per_epoch} micro-batch(es), fewer than {steps}")]
    plan = loader.plan[:steps]
    micro_batches = [next(loader) for _ in range(steps)]
    rows = [[ctx.examples[i] for i in row] for micro in plan for row in micro]
    large = collate(rows, packed=cfg.data.packing == "bfd", pad_id=ctx.tokenizer.pad_token_id,
                    max_length=cfg.data.max_length)
    autocast = loop.precision_context(cfg, ctx.device)
    ref_loss, ref_grads = loss_and_grads(ctx, model_for(ctx, cfg), [large], autocast=autocast)
    model = model_for(ctx, cfg)
    loss_sum, units = loop.accumulate_gradients(model, build_objective(cfg.objective), micro_batches,
                                                device=ctx.device, autocast=autocast)
    grads = grads_of(model)
    detail = f"{steps} micro-batches of {cfg.train.micro_batch_size} rows vs one of {len(rows)} rows"
    switch = "train.grad_accum=1"
    return [compare("accumulation: loss", relative(float(loss_sum) / max(units, 1), ref_loss), ctx.tolerance.loss,
                    switch=switch, detail=detail),
            compare("accumulation: gradients", grad_difference(grads, ref_grads), ctx.tolerance.grad, switch=switch,
                    detail=detail)]


def speed_switches(cfg: Config) -> list[tuple[str, str, Callable[[Config], None]]]:
    """(row label, the override that turns it off, how to turn it on in a plain config) for each speed switch
    `cfg` turns on."""
    switches = []
    if cfg.model.attention != "sdpa":
        switches.append((f"{cfg.model.attention} attention", "model.attention=sdpa",
                         lambda c: setattr(c.model, "attention", cfg.model.attention)))
    if cfg.kernels.fused_loss:
        switches.append(("fused loss", "kernels.fused_loss=false", lambda c: setattr(c.kernels, "fused_loss", True)))
    if cfg.kernels.fused_ops:
        switches.append(("fused ops", "kernels.fused_ops=false", lambda c: setattr(c.kernels, "fused_ops", True)))
    if cfg.kernels.fused_dequantize:
        switches.append(("fused dequantize", "kernels.fused_dequantize=false",
                         lambda c: setattr(c.kernels, "fused_dequantize", True)))
    if cfg.activations.checkpointing != "none" or cfg.activations.offload:
        switches.append(("activation checkpointing", "activations.checkpointing=none activations.offload=false",
                         lambda c: setattr(c, "activations", copy.deepcopy(cfg.activations))))
    if cfg.compile.mode != "none":
        switches.append((f"compile {cfg.compile.mode}", "compile.mode=none",
                         lambda c: setattr(c, "compile", copy.deepcopy(cfg.compile))))
    return switches


def with_ignored_labels(batch: Batch) -> Batch:
    """The batch, with the first quarter of every row's targets ignored if it had no ignored target yet (so the
    fused paths always see IGNORE_INDEX rows, as prompt masking and padding produce)."""
    if (batch.labels == IGNORE_INDEX).any():
        return batch
    labels = batch.labels.clone()
    labels[:, :max(1, labels.shape[1] // 4)] = IGNORE_INDEX
    return Batch(input_ids=batch.input_ids, labels=labels, position_ids=batch.position_ids,
                 document_ids=batch.document_ids, attention_lengths=batch.attention_lengths)


def check_kernels(ctx: CheckContext) -> list[CheckResult]:
    cfg = ctx.cfg
    switches = speed_switches(cfg)
    if not switches:
        return [not_applicable("kernels/compile: == plain ops", "no attention backend, fused kernel, activation "
                               "checkpointing or compile is switched on")]
    batch = with_ignored_labels(next(loader_for(ctx, cfg)))
    plain = plain_config(cfg)
    autocast = loop.precision_context(cfg, ctx.device)
    ref_loss, ref_grads = loss_and_grads(ctx, model_for(ctx, plain), [batch], autocast=autocast)
    variants = []
    for label, switch, turn_on in switches:
        variant = copy.deepcopy(plain)
        turn_on(variant)
        variants.append((label, switch, variant))
    if len(switches) > 1:
        variants.append(("all together", " ".join(switch for _, switch, _ in switches), cfg))
    rows = []
    for label, switch, variant in variants:
        loss, grads = loss_and_grads(ctx, model_for(ctx, variant), [batch], autocast=autocast)
        rows += [compare(f"kernels: {label}: loss", relative(loss, ref_loss), ctx.tolerance.loss, switch=switch),
                 compare(f"kernels: {label}: gradients", grad_difference(grads, ref_grads), ctx.tolerance.grad,
                         switch=switch)]
    return rows


def check_precision(ctx: CheckContext, *, steps: int) -> list[CheckResult]:
    cfg = ctx.cfg
    if cfg.precision.mode == "fp32":
        return [not_applicable("precision: loss drift vs fp32", "precision.mode=fp32 is the reference itself")]
    low = plain_config(cfg)
    full = copy.deepcopy(low)
    full.precision.mode = "fp32"
    ref_losses = Run(ctx, full).losses(steps)
    low_losses = Run(ctx, low).losses(steps)
    drifts = [relative(a, b) for a, b in zip(low_losses, ref_losses)]
    worst = max(range(steps), key=lambda i: drifts[i])
    detail = (f"{cfg.precision.mode}, {steps} steps; largest at step {worst + 1}; losses fp32 "
              f"{', '.join(f'{x:.4f}' for x in ref_losses)}; {cfg.precision.mode} "
              f"{', '.join(f'{x:.4f}' for x in low_losses)}")
    if drifts[worst] > ctx.tolerance.drift and drifts[0] <= ctx.tolerance.loss:
        # the first step agrees, so the kernels are right and training amplified rounding: say so
        detail += (f"; step 1 agrees ({drifts[0]:.2g}): the drift grows with training, the more so at a high "
                   f"train.lr ({cfg.train.lr:g})")
    return [compare("precision: loss drift vs fp32", drifts[worst], ctx.tolerance.drift,
                    switch="precision.mode=fp32", detail=detail)]
