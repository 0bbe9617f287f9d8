"""Data sanity: what the model is trained on is what the user meant, recomputed independently of the pipeline.

- `check_data`: every example ends in a trained stop token (unless it was cut, see below): the EOS, or for
  `data.format=chat` the end-of-turn marker of its last assistant turn (a special token such as `<|im_end|>`;
  the template text after it is context, not a target); packed/padded batches keep it; the pad token is not the
  EOS and no padding position is ever a target; and, re-tokenizing the first records here (from the rendered text
  or chat segments, not through the pipeline's example builders), the loss mask covers exactly the completion and
  its EOS (every token for `data.format=text`; the assistant turns for `chat`).
- `check_truncation`: re-counts the records longer than `data.max_length` and compares with what the data report
  says it truncated or dropped, so no sample is cut silently.

Records are read as training reads them (`optrush.data.dataset.read_source`: any source, data.json_columns,
data.on_error=skip skipping the rows training rejected; the truncation count also applies the data.clean rules).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter

from optrush.check.harness import CheckContext, loader_for
from optrush.check.report import CheckResult, compare, not_applicable
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.chat import chat_segments
from optrush.data.clean import clean_stream, rules_from_config
from optrush.data.dataset import read_source, tokenize
from optrush.data.formats import render
from optrush.data.reader import DataError
from optrush.data.sources import Recounted

MASK_SAMPLE = 256
"""Records re-tokenized for the loss-mask check."""
BATCH_SAMPLE = 8
"""Micro-batches inspected for EOS and padding labels."""
CHUNK = 1024
"""Records tokenized per batched tokenizer call in the truncation count."""


@dataclass(frozen=True)
class DocumentEnd:
    """The target every example must end with, so the model learns where a document stops."""
    stop_ids: frozenset[int]
    last_trained: bool
    """Chat: the stop token is the last *trained* target (template text after the final turn is masked)."""
    example_row: str
    batch_row: str
    switch: str
    what: str
    """What a failing example does, completing "N examples ..." and "documents that ..."."""

    def reached(self, labels: list[int]) -> bool:
        if self.last_trained:  # from the end: only the masked template text after the last turn is passed over
            last = next((label for label in reversed(labels) if label != IGNORE_INDEX), None)
        else:
            last = labels[-1] if labels else None
        return last is not None and last in self.stop_ids


def document_end(ctx: CheckContext) -> DocumentEnd:
    tokenizer = ctx.tokenizer
    if ctx.cfg.data.format == "chat":
        stops = set(tokenizer.all_special_ids) - {tokenizer.bos_token_id, tokenizer.pad_token_id}
        return DocumentEnd(stop_ids=frozenset(stops), last_trained=True,
                           example_row="data: end of turn trained at the end of every conversation",
                           batch_row="data: end of turn kept in the batches",
                           switch="(give the tokenizer the chat template's end-of-turn marker as a special token, "
                                  "or set data.chat_template to a template whose turns end in one)",
                           what="do not end their last assistant turn with a trained special token (the "
                                "end-of-turn marker)")
    return DocumentEnd(stop_ids=frozenset({tokenizer.eos_token_id}), last_trained=False,
                       example_row="data: EOS trained at the end of every example",
                       batch_row="data: EOS kept in the batches",
                       switch="(no switch: a data pipeline bug; check data.format and the tokenizer, report it)",
                       what="end without a trained EOS")


def check_data(ctx: CheckContext) -> list[CheckResult]:
    eos, pad = ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id
    max_length = ctx.cfg.data.max_length
    end = document_end(ctx)
    # An example of exactly max_length positions may have been truncated (check_truncation counts those).
    missing = sum(1 for e in ctx.examples if len(e) < max_length and not end.reached(e.labels))
    loader = loader_for(ctx, ctx.cfg)
    batches = [next(loader) for _ in range(min(BATCH_SAMPLE, loader.batches_per_epoch))]
    ends_without_stop, trained_padding = 0, 0
    for batch in batches:
        ends_without_stop += sum(1 for labels in documents(batch) if len(labels) < max_length
                                 and not end.reached(labels))
        padding = padding_mask(batch)
        trained_padding += int((batch.labels[padding] != IGNORE_INDEX).sum())
        if pad != eos:  # else every trained EOS would count here: the pad != EOS row reports that tokenizer
            trained_padding += int((batch.labels == pad).sum())
    return [
        compare(end.example_row, missing, 0, switch=end.switch,
                detail=f"{missing} of {len(ctx.examples)} examples shorter than data.max_length {end.what}"),
        compare(end.batch_row, ends_without_stop, 0, switch="data.packing=none",
                detail=f"documents of the first {len(batches)} micro-batches that {end.what}"),
        compare("data: pad token != EOS", float(pad == eos), 0, switch="(give the tokenizer its own pad token)",
                detail=f"pad id {pad}, EOS id {eos}"),
        compare("data: padding never trained", trained_padding, 0, switch="data.packing=none",
                detail=f"padding positions with a target (or pad-token targets) in {len(batches)} micro-batches"),
        check_loss_mask(ctx),
    ]


def documents(batch: Batch) -> Iterator[list[int]]:
    """The labels of every real document of a micro-batch (packed rows split by document id, padded rows cut to
    their length)."""
    labels = batch.labels.tolist()
    if batch.document_ids is None:
        for row, length in zip(labels, batch.attention_lengths.tolist()):
            yield row[:length]
        return
    for row, ids in zip(labels, batch.document_ids.tolist()):
        start = 0
        for t in range(1, len(ids) + 1):
            if t == len(ids) or ids[t] != ids[start]:
                if ids[start] >= 0:
                    yield row[start:t]
                start = t


def padding_mask(batch: Batch):
    if batch.document_ids is not None:
        return batch.document_ids < 0
    return batch.position_ids >= batch.attention_lengths[:, None]


def check_loss_mask(ctx: CheckContext) -> CheckResult:
    data_format = ctx.cfg.data.format
    name = {"text": "data: every text token trained",
            "chat": "data: loss on assistant turns only"}.get(data_format, "data: loss on completions only")
    switch = ("(a data pipeline bug: check data.chat_template and data.messages_column)" if data_format == "chat"
              else "(a data pipeline bug: check data.format and the prompt/completion columns)")
    records = list(islice(source_records(ctx), MASK_SAMPLE))
    by_tokens = {hash(tuple(e.input_ids)): e for e in ctx.examples}
    checked, wrong = 0, 0
    for inputs, labels in expected_examples(ctx, records):
        example = by_tokens.get(hash(tuple(inputs)))
        if example is None:  # cut, dropped, held out for eval, or the pipeline lost the EOS (caught above)
            continue
        checked += 1
        wrong += example.labels != labels
    if not checked:
        return not_applicable(name, f"none of the first {len(records)} records is an untruncated training "
                                    "example to compare with")
    return compare(name, wrong, 0, switch=switch,
                   detail=f"{wrong} of {checked} re-tokenized records have other targets or masks")


def check_truncation(ctx: CheckContext) -> list[CheckResult]:
    cfg, report = ctx.cfg.data, ctx.data_report
    records = training_records(ctx)
    too_long, count = 0, 0
    while chunk := list(islice(records, CHUNK)):
        lengths = [len(inputs) for inputs, _ in expected_examples(ctx, chunk)]
        too_long += sum(length > cfg.max_length for length in lengths)
        count += len(lengths)
    tally = report.train
    reported = tally.truncated + tally.split + tally.dropped.get("too_long", 0) + \
        tally.dropped.get("no_trained_tokens", 0)
    return [compare("data: no sample truncated silently", abs(too_long - reported), 0,
                    switch="data.too_long=error",
                    detail=f"{too_long} of {count} records exceed data.max_length={cfg.max_length}; the data "
                           f"report counts {tally.truncated} truncated, {tally.split} split, "
                           f"{tally.dropped.get('too_long', 0)} dropped as too long, "
                           f"{tally.dropped.get('no_trained_tokens', 0)} left without targets")]


def source_records(ctx: CheckContext) -> Iterator[tuple[str, dict]]:
    """(where, record) of data.path as training reads it; with data.on_error=skip the rows training rejected (and
    counted) are skipped."""
    cfg = ctx.cfg.data
    return read_source(cfg.path, cfg=cfg, rejects=Recounted() if cfg.on_error == "skip" else None)


def training_records(ctx: CheckContext) -> Iterator[tuple[str, dict]]:
    """`source_records` that pass the data.clean rules: the records training encodes."""
    records, _ = clean_stream(source_records(ctx), rules_from_config(ctx.cfg.data, ctx.tokenizer),
                              reread=lambda: source_records(ctx), record=itemgetter(1))
    return records


Segments = list[tuple[list[int], bool]]
"""A record as (token ids, trained) pieces, in order."""


def expected_examples(ctx: CheckContext, records: Iterable[tuple[str, dict]]) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, labels) each record should become, built here from its token segments: a target is trained when
    its token is in a trained segment. Records training rejected under data.on_error=skip are left out."""
    for parts in token_segments(ctx, records):
        sequence = [token for ids, _ in parts for token in ids]
        trained = [flag for ids, flag in parts for _ in ids]
        yield sequence[:-1], [token if flag else IGNORE_INDEX for token, flag in zip(sequence[1:], trained[1:])]


def token_segments(ctx: CheckContext, records: Iterable[tuple[str, dict]]) -> list[Segments]:
    """(token ids, trained) segments per record: BOS, prompt (masked), completion and EOS (trained) for the
    single-text formats; the chat template's segments (assistant turns trained) for chat. One tokenizer call."""
    cfg, tokenizer = ctx.cfg.data, ctx.tokenizer
    texts: list[list[tuple[str, bool]]] = []
    for where, record in records:
        try:
            if cfg.format == "chat":
                texts.append(chat_segments(record, cfg=cfg, tokenizer=tokenizer, where=where))
            else:
                prompt, completion = render(record, cfg=cfg, where=where)
                texts.append([(prompt, False), (completion, True)])
        except DataError:
            if cfg.on_error != "skip":  # training would have stopped at this record already
                raise
    ids = iter(tokenize([text for parts in texts for text, _ in parts], tokenizer))
    segments = [[(next(ids), trained) for _, trained in parts] for parts in texts]
    if cfg.format == "chat":  # the template's text carries its own BOS and end-of-turn markers
        return segments
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [[(bos, False), *parts, ([tokenizer.eos_token_id], True)] for parts in segments]
