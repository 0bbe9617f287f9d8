"""`optrush check`: the clean debug config passes, and each check fails when its fault is planted."""
import json

import pytest
import torch

from optrush.check import run_checks
from optrush.cli.main import main
from optrush.config import ConfigError, load_config
from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import Example
from optrush.models import layers


def empty_config(tmp_path):
    path = tmp_path / "check.yaml"
    path.write_text("# everything comes from the overrides\n")
    return path


def failed(report) -> list[str]:
    return [row.name for row in report.rows if row.passed is False]


def test_clean_debug_config_passes_every_check(debug_overrides, tmp_path):
    out = tmp_path / "check.json"
    assert main(["check", str(empty_config(tmp_path)), *debug_overrides, "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"]
    assert report["config"]["model"]["preset"] == "debug" and "torch" in report["provenance"]
    statuses = {row["name"]: row["status"] for row in report["rows"]}
    for name in ("packing: loss", "packing: gradients", "accumulation: gradients", "resume: batch order",
                 "resume: weights", "data: EOS trained at the end of every example", "data: loss on completions only",
                 "data: no sample truncated silently", "numerics: gradient on every trainable parameter"):
        assert statuses[name] == "PASS", name
    # features the config does not use (or optrush does not have yet) are reported, never passed silently
    for name in ("kernels/compile: == plain ops", "precision: loss drift vs fp32", "multi-GPU: == single device"):
        assert statuses[name] == "n/a", name
    assert all(row["tolerance"] is not None for row in report["rows"] if row["status"] == "PASS"
               and not row["name"].startswith("numerics: loss"))


def test_fast_subset_for_train_verify(debug_overrides):
    from optrush.check import FAST, run_fast_checks

    cfg = load_config(None, [*debug_overrides, "train.verify=true"])
    assert cfg.train.verify
    report = run_fast_checks(cfg)
    assert report.passed
    assert {row.name.split(":")[0] for row in report.rows} == {"data", "numerics", "packing", "accumulation"}
    assert set(FAST) == {"data", "numerics", "packing", "accumulation"}


def test_contaminating_mask_fails_packing(debug_overrides, monkeypatch):
    def causal_only(document_ids, *, seq_len, sliding_window, device):  # lets documents see their neighbours
        return layers.attention_mask(None, seq_len=seq_len, sliding_window=sliding_window, device=device)

    monkeypatch.setattr(layers, "SDPA", layers.AttentionBackend(name="sdpa", build_mask=causal_only,
                                                                attend=layers.sdpa_attention))
    report = run_checks(load_config(None, debug_overrides), only=["packing"])
    assert failed(report) == ["packing: loss", "packing: gradients"]
    assert report.rows[0].switch_to_turn_off == "data.packing=none"


def test_per_micro_batch_mean_fails_accumulation(debug_overrides, monkeypatch):
    from optrush.train import loop

    def mean_per_micro_batch(model, objective, micro_batches, *, device, autocast):
        total, units = 0.0, 0
        for batch in micro_batches:
            loss_sum, _ = objective(model, batch.to(device))
            (loss_sum / objective.units(batch) / len(micro_batches)).backward()
            total, units = total + loss_sum.item(), units + objective.units(batch)
        return total, units

    monkeypatch.setattr(loop, "accumulate_gradients", mean_per_micro_batch)
    report = run_checks(load_config(None, debug_overrides), only=["accumulation"])
    assert "accumulation: gradients" in failed(report)


def test_wrong_fused_loss_fails_kernels_and_the_cli_exits_non_zero(debug_overrides, monkeypatch, tmp_path):
    import optrush.kernels

    fused = optrush.kernels.fused_linear_cross_entropy

    def off_by_one_percent(*args, **kwargs):
        return fused(*args, **kwargs) * 1.01

    monkeypatch.setattr(optrush.kernels, "fused_linear_cross_entropy", off_by_one_percent)
    out = tmp_path / "check.json"
    code = main(["check", str(empty_config(tmp_path)), *debug_overrides, "kernels.fused_loss=true",
                 "--only", "kernels", "--json", str(out)])
    assert code == 1
    rows = json.loads(out.read_text())["rows"]
    loss_row = next(row for row in rows if row["name"] == "kernels: fused loss: loss")
    assert not loss_row["passed"] and loss_row["switch_to_turn_off"] == "kernels.fused_loss=false"
    assert loss_row["measured"] == pytest.approx(0.01, rel=1e-3)


def test_lost_sampler_state_fails_resume(debug_overrides, monkeypatch):
    from optrush.data.loader import BatchLoader

    monkeypatch.setattr(BatchLoader, "load_state_dict", lambda self, state: None)
    report = run_checks(load_config(None, debug_overrides), only=["resume"], steps=2)
    assert "resume: batch order" in failed(report)
    assert "resume: losses" in failed(report)


def test_missing_eos_fails_data(debug_overrides, monkeypatch):
    import optrush.data.dataset as dataset

    build_example = dataset.build_example

    def without_eos(prompt_ids, completion_ids, *, bos_id, eos_id):
        example = build_example(prompt_ids, completion_ids, bos_id=bos_id, eos_id=eos_id)
        return Example(input_ids=example.input_ids[:-1], labels=example.labels[:-1])

    monkeypatch.setattr(dataset, "build_example", without_eos)
    report = run_checks(load_config(None, debug_overrides), only=["data"])
    assert "data: EOS trained at the end of every example" in failed(report)
    assert "data: EOS kept in the batches" in failed(report)


def test_trained_prompt_fails_the_loss_mask_check(debug_overrides, monkeypatch):
    import optrush.data.dataset as dataset

    def prompt_trained(prompt_ids, completion_ids, *, bos_id, eos_id):
        sequence = [bos_id] + prompt_ids + completion_ids + [eos_id]
        return Example(input_ids=sequence[:-1], labels=sequence[1:])

    monkeypatch.setattr(dataset, "build_example", prompt_trained)
    report = run_checks(load_config(None, debug_overrides), only=["data"])
    assert failed(report) == ["data: loss on completions only"]


def test_silent_truncation_fails(debug_overrides, monkeypatch):
    import optrush.data.dataset as dataset

    fit_length = dataset.fit_length

    def uncounted(example, *, cfg, where, tally):
        before = tally.truncated
        kept = fit_length(example, cfg=cfg, where=where, tally=tally)
        tally.truncated = before  # cuts the example but does not report it
        return kept

    monkeypatch.setattr(dataset, "fit_length", uncounted)
    report = run_checks(load_config(None, debug_overrides), only=["truncation"])
    assert failed(report) == ["data: no sample truncated silently"]


def test_dead_layer_fails_numerics(debug_overrides, monkeypatch):
    monkeypatch.setattr(layers.FeedForward, "forward", lambda self, x: torch.zeros_like(x))
    report = run_checks(load_config(None, debug_overrides), only=["numerics"])
    assert failed(report) == ["numerics: gradient on every trainable parameter"]


def test_low_precision_only_loss_fault_fails_precision_drift(debug_overrides, monkeypatch):
    reference_loss = layers.linear_cross_entropy

    def wrong_in_bf16(hidden, weight, labels, *, reduction="mean"):  # as a dtype-dispatched kernel can be
        loss = reference_loss(hidden, weight, labels, reduction=reduction)
        return loss * 1.1 if hidden.dtype == torch.bfloat16 else loss

    cfg = load_config(None, [*debug_overrides, "precision.mode=bf16_pure"])
    clean = run_checks(cfg, only=["precision"], steps=2)
    assert not failed(clean), clean.rows
    monkeypatch.setattr(layers, "linear_cross_entropy", wrong_in_bf16)
    assert failed(run_checks(cfg, only=["precision"], steps=2)) == ["precision: loss drift vs fp32"]


def test_lora_numerics_exempt_a_until_b_moves_but_catch_a_dead_b(debug_overrides, monkeypatch):
    from optrush.peft import lora

    cfg = load_config(None, debug_overrides + ["peft.method=lora", "peft.r=4"])
    clean = run_checks(cfg, only=["numerics"])
    assert not failed(clean), clean.rows
    assert "lora_A exempt" in clean.rows[-1].detail
    linear = torch.nn.functional.linear
    monkeypatch.setattr(lora.LoRALinear, "forward", lambda self, x: linear(x, self.weight, self.bias) + self.scaling
                        * linear(linear(x, self.lora_A), self.lora_B.detach()))  # B cut from the graph
    report = run_checks(cfg, only=["numerics"])
    assert failed(report) == ["numerics: gradient on every trainable parameter"]
    assert "lora_B" in report.rows[-1].detail


def test_a_crashing_check_is_a_failed_row(debug_overrides, monkeypatch):
    from optrush.check import runner

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(runner.GROUPS, "numerics", broken)
    report = run_checks(load_config(None, debug_overrides), only=["numerics"])
    assert not report.passed and "boom" in report.rows[0].detail


def test_labels_with_ignore_index_reach_the_kernel_comparison():
    from optrush.check.equivalence import with_ignored_labels
    from optrush.data.batch import Batch

    batch = Batch(input_ids=torch.zeros(2, 8, dtype=torch.long), labels=torch.ones(2, 8, dtype=torch.long),
                  position_ids=torch.arange(8).expand(2, 8))
    assert (with_ignored_labels(batch).labels == IGNORE_INDEX).any()


def test_lora_zero_init_check_passes_and_catches_a_nonzero_adapter(debug_overrides, monkeypatch):
    from optrush.peft import lora

    cfg = load_config(None, debug_overrides + ["peft.method=lora", "peft.r=4"])
    row = next(r for r in run_checks(cfg, only=["peft"]).rows if r.name.startswith("peft: zero-init"))
    assert row.passed is True and row.measured == 0.0

    real_init = lora.LoRALinear.__init__

    def nonzero_b(self, *args, **kwargs):  # the planted fault: B no longer starts at zero
        real_init(self, *args, **kwargs)
        torch.nn.init.normal_(self.lora_B, std=0.1)

    monkeypatch.setattr(lora.LoRALinear, "__init__", nonzero_b)
    row = next(r for r in run_checks(cfg, only=["peft"]).rows if r.name.startswith("peft: zero-init"))
    assert row.passed is False and row.switch_to_turn_off == "peft.method=none"


def test_multi_gpu_row_trains_on_two_ranks_and_matches_one_process(debug_overrides):
    cfg = load_config(None, debug_overrides + ["parallel.strategy=ddp"])
    report = run_checks(cfg, only=["accumulation", "multi_gpu"], steps=2)  # one-process rows still run
    *one_process, row = report.rows
    assert all(r.passed for r in one_process), one_process
    assert row.passed is True and row.measured <= 1e-6, row
    (single,) = run_checks(load_config(None, debug_overrides), only=["multi_gpu"], steps=2).rows
    assert single.passed is None  # strategy none: not applicable


PLANTED_LOCAL_MEAN = """
import os
if "RANK" in os.environ:  # only in the torchrun ranks: each normalises by its own token count, reduces nothing
    import optrush.train.loop as loop
    loop.all_reduce_sum = lambda values, *, device: [float(v) for v in values]
"""


def test_multi_gpu_row_catches_a_per_rank_loss_normalisation(debug_overrides, monkeypatch, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(PLANTED_LOCAL_MEAN)  # imported by every child interpreter
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (row,) = run_checks(load_config(None, debug_overrides + ["parallel.strategy=ddp"]), only=["multi_gpu"],
                        steps=2).rows
    assert row.passed is False and row.switch_to_turn_off == "parallel.strategy=none", row


def chat_overrides(debug_overrides, tmp_path, conversations=6):
    """The debug overrides on a small chat file (the conftest tokenizer renders ChatML, <|im_end|> special)."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Soup number {i}?"},
        {"role": "assistant", "content": f"Stir {i} times."}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Serve it hot."}]}) + "\n" for i in range(conversations)))
    return [*debug_overrides, f"data.path={path}", "data.format=chat"]


def test_chat_data_passes_the_data_checks_and_a_lost_end_of_turn_fails(debug_overrides, tmp_path, monkeypatch):
    import optrush.data.dataset as dataset

    cfg = load_config(None, chat_overrides(debug_overrides, tmp_path))
    report = run_checks(cfg, only=["data", "truncation"])
    assert report.passed, report.rows
    assert {"data: end of turn trained at the end of every conversation", "data: end of turn kept in the batches",
            "data: loss on assistant turns only"} <= {row.name for row in report.rows if row.passed}
    chat_segments = dataset.chat_segments

    def end_marker_masked(record, **kwargs):  # the planted fault: the model would never learn to stop
        segments = []
        for text, trained in chat_segments(record, **kwargs):
            if trained and text.endswith("<|im_end|>"):
                segments += [(text.removesuffix("<|im_end|>"), True), ("<|im_end|>", False)]
            else:
                segments.append((text, trained))
        return segments

    monkeypatch.setattr(dataset, "chat_segments", end_marker_masked)
    assert set(failed(run_checks(cfg, only=["data"]))) == {
        "data: end of turn trained at the end of every conversation", "data: end of turn kept in the batches",
        "data: loss on assistant turns only"}


def test_data_checks_read_the_data_as_training_does(debug_overrides, tmp_path):
    """A Parquet source, a bad JSON line under data.on_error=skip, and data.clean rules (which drop the longest
    records): the checks read what training read, so the loss mask is compared and the truncation count agrees."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Soup {i}: ", "completion": "Stir well. " * (i % 4 + 1)} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet")
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n")
    for source in ("pc.parquet", "pc.jsonl"):
        cfg = load_config(None, [*debug_overrides, f"data.path={tmp_path / source}", "data.format=prompt_completion",
                                 "data.on_error=skip", "data.max_length=16", "data.clean.max_chars=40"])
        report = run_checks(cfg, only=["data", "truncation"])
        # every row ran and passed: half the kept records are truncated, the rest are compared token by token
        assert all(row.passed for row in report.rows), (source, report.rows)


def test_check_on_preference_data_says_what_it_checks(debug_overrides, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Soup?", "chosen": "Stir.", "rejected": "No."}) + "\n")
    cfg = load_config(None, [*debug_overrides, f"data.path={path}", "data.format=preference", "objective=dpo"])
    with pytest.raises(ConfigError, match=r"causal_lm/sft runs only \(objective=dpo\).*objective=sft"):
        run_checks(cfg, only=["data"])
