"""Data sanity: what the model is trained on is what the user meant, recomputed independently of the pipeline.

- `check_data`: every example ends in a trained EOS (unless it was cut, see below); packed/padded batches keep
  it; the pad token is not the EOS and no padding position is ever a target; and, re-tokenizing the first records
  here (not through `optrush.data.formats`), the loss mask covers exactly the completion and its EOS (every token
  for `data.format=text`).
- `check_truncation`: re-counts the records longer than `data.max_length` and compares with what the data report
  says it truncated or dropped, so no sample is cut silently.
"""
from __future__ import annotations

from itertools import islice

from optrush.check.harness import CheckContext, loader_for
from optrush.check.report import CheckResult, compare, not_applicable
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.dataset import tokenize
from optrush.data.formats import render
from optrush.data.reader import read_records

MASK_SAMPLE = 256
"""Records re-tokenized for the loss-mask check."""
BATCH_SAMPLE = 8
"""Micro-batches inspected for EOS and padding labels."""


def check_data(ctx: CheckContext) -> list[CheckResult]:
    eos, pad = ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id
    max_length = ctx.cfg.data.max_length
    # An example of exactly max_length positions may have been truncated (check_truncation counts those).
    missing = sum(1 for e in ctx.examples if len(e) < max_length and e.labels[-1] != eos)
    loader = loader_for(ctx, ctx.cfg)
    batches = [next(loader) for _ in range(min(BATCH_SAMPLE, loader.batches_per_epoch))]
    ends_without_eos, trained_padding = 0, 0
    for batch in batches:
        # a document of max_length positions may have been cut before its EOS (check_truncation counts those)
        ends = document_ends(batch) & (batch.position_ids + 1 < max_length)
        padding = padding_mask(batch)
        ends_without_eos += int((batch.labels[ends] != eos).sum())
        trained_padding += int((batch.labels[padding] != IGNORE_INDEX).sum()) + int((batch.labels == pad).sum())
    data_switch = "(no switch: a data pipeline bug; check data.format and the tokenizer, report it)"
    return [
        compare("data: EOS trained at the end of every example", missing, 0, switch=data_switch,
                detail=f"{missing} of {len(ctx.examples)} examples shorter than data.max_length end without "
                       "a trained EOS"),
        compare("data: EOS kept in the batches", ends_without_eos, 0, switch="data.packing=none",
                detail=f"documents of the first {len(batches)} micro-batches whose last target is not EOS"),
        compare("data: pad token != EOS", float(pad == eos), 0, switch="(give the tokenizer its own pad token)",
                detail=f"pad id {pad}, EOS id {eos}"),
        compare("data: padding never trained", trained_padding, 0, switch="data.packing=none",
                detail=f"padding positions with a target (or pad-token targets) in {len(batches)} micro-batches"),
        check_loss_mask(ctx),
    ]


def document_ends(batch: Batch):
    """Boolean (B, T): the last position of every real document (where its EOS must be the target)."""
    if batch.document_ids is not None:
        ids = batch.document_ids
        following = ids.new_full(ids.shape, -1)
        following[:, :-1] = ids[:, 1:]
        return (ids >= 0) & (following != ids)
    positions = batch.position_ids
    return positions == (batch.attention_lengths[:, None] - 1)


def padding_mask(batch: Batch):
    if batch.document_ids is not None:
        return batch.document_ids < 0
    return batch.position_ids >= batch.attention_lengths[:, None]


def expected_labels(sequence: list[int], *, masked: int) -> list[int]:
    """Targets of `sequence` (BOS + prompt + completion + EOS): the next token, ignored for the first `masked`
    positions (those whose target is still a prompt token)."""
    return [IGNORE_INDEX if t < masked else sequence[t + 1] for t in range(len(sequence) - 1)]


def check_loss_mask(ctx: CheckContext) -> CheckResult:
    cfg = ctx.cfg.data
    name = "data: every text token trained" if cfg.format == "text" else "data: loss on completions only"
    records = [record for _, record in islice(read_records(cfg.path), MASK_SAMPLE)]
    texts = [render(record, cfg=cfg, where=f"{cfg.path} record {i + 1}") for i, record in enumerate(records)]
    prompts = tokenize([p for p, _ in texts], ctx.tokenizer)
    completions = tokenize([c for _, c in texts], ctx.tokenizer)
    bos = [] if ctx.tokenizer.bos_token_id is None else [ctx.tokenizer.bos_token_id]
    by_tokens = {hash(tuple(e.input_ids)): e for e in ctx.examples}
    checked, wrong = 0, 0
    for prompt, completion in zip(prompts, completions):
        sequence = bos + prompt + completion + [ctx.tokenizer.eos_token_id]
        example = by_tokens.get(hash(tuple(sequence[:-1])))
        if example is None:  # cut, dropped, held out for eval, or the pipeline lost the EOS (caught above)
            continue
        checked += 1
        wrong += example.labels != expected_labels(sequence, masked=max(0, len(bos) + len(prompt) - 1))
    if not checked:
        return not_applicable(name, f"none of the first {len(records)} records is an untruncated training "
                                    "example to compare with")
    return compare(name, wrong, 0, switch="(a data pipeline bug: check data.format and the prompt/completion "
                   "columns)", detail=f"{wrong} of {checked} re-tokenized records have other targets or masks")


def check_truncation(ctx: CheckContext) -> list[CheckResult]:
    cfg, report = ctx.cfg.data, ctx.data_report
    bos = 0 if ctx.tokenizer.bos_token_id is None else 1
    too_long, start = 0, 0
    records = read_records(cfg.path)
    while chunk := [record for _, record in islice(records, 1024)]:
        texts = [render(record, cfg=cfg, where=f"{cfg.path} record {start + i + 1}") for i, record in enumerate(chunk)]
        prompts = tokenize([p for p, _ in texts], ctx.tokenizer)
        completions = tokenize([c for _, c in texts], ctx.tokenizer)
        too_long += sum(bos + len(p) + len(c) > cfg.max_length for p, c in zip(prompts, completions))
        start += len(chunk)
    tally = report.train
    reported = tally.truncated + tally.dropped.get("too_long", 0) + tally.dropped.get("no_trained_tokens", 0)
    return [compare("data: no sample truncated silently", abs(too_long - reported), 0,
                    switch="data.too_long=error",
                    detail=f"{too_long} of {start} records exceed data.max_length={cfg.max_length}; the data "
                           f"report counts {tally.truncated} truncated, {tally.dropped.get('too_long', 0)} dropped "
                           f"as too long, {tally.dropped.get('no_trained_tokens', 0)} left without targets")]
