"""`optrush plan` at long rows: varlen attention (no dense document mask) and MLP chunks are searched past
LONG_ROW_TOKENS, short rows plan as before; and the small fixes near it (`--gpus 2x`, the max-context report's
memory label, the ladder loss chart's step ticks)."""
import pytest
import yaml

from optrush.bench.max_context import markdown
from optrush.config import load_config
from optrush.models.presets import get_preset
from optrush.plan import GPUS, parse_gpus, plan
from optrush.plan.search import LONG_ROW_TOKENS, advice_changes, candidate_setups, evaluate, extend_context
from optrush.plan.setup import Setup, setup_from_config
from optrush.plan.speed import calibrate, load_measurements

LLAMA_1B = get_preset("llama3.2-1b")
BASE = ("model.preset=llama3.2-1b",)
LONG = 524_288


@pytest.fixture(scope="module")
def measured():
    return load_measurements()


@pytest.fixture(scope="module")
def calibration(measured):
    return calibrate(measured)


def test_half_a_million_tokens_fit_one_h100_with_varlen_and_mlp_chunks(calibration):
    """long_context_1b_h100.md trained 524,288 tokens of the 1B shape in 45.9 GiB; the sdpa-only search found
    nothing under 301 GiB (its dense document mask alone: 256 GiB)."""
    args, extension = extend_context(LLAMA_1B, LONG)
    candidates = plan(args, gpu=GPUS["H100"], seq_len=LONG, micro_batch=1, base_overrides=BASE + tuple(extension),
                      calibration=calibration)
    fitting = [c for c in candidates if c.fits]
    assert fitting and all(c.setup.attention == "varlen" for c in fitting)
    assert fitting[0].setup.mlp_chunk_tokens == LONG_ROW_TOKENS
    assert not any(c.fits for c in candidates if c.setup.attention == "sdpa")  # the dense mask does not fit
    # the measured setup (eager, full checkpointing with offload, fused loss, 8192-token MLP chunks) is among them
    assert any(c.setup.compile == "none" and c.setup.checkpointing == "full" and c.setup.offload
               and not c.setup.skip_last and c.setup.mlp_chunk_tokens and c.setup.precision == "bf16_pure"
               for c in fitting)


def test_varlen_on_packed_rows_is_predicted_as_the_measured_unmasked_row(measured, calibration):
    """The accuracy check's long rows are synthetic (no document mask: SDPA's causal kernel, no mask); the same
    setup on packed rows with varlen must be predicted the same, and fit."""
    row = next(m for m in measured if m.source == "long_context_1b_h100.json" and m.setup.seq_len == LONG)
    packed = row.setup.replace(attention="varlen", document_mask=True)
    args, _ = extend_context(LLAMA_1B, LONG)
    candidate = evaluate(args, packed, gpu=GPUS["H100"], calibration=calibration)
    assert candidate.fits
    assert candidate.memory.peak_gib == pytest.approx(evaluate(row.args, row.setup, gpu=GPUS["H100"],
                                                               calibration=calibration).memory.peak_gib, rel=0.01)
    assert candidate.memory.peak_gib == pytest.approx(row.peak_gib, rel=0.10)


def test_short_packed_rows_try_varlen_and_unpacked_rows_keep_sdpa(calibration):
    """Rows of at most LONG_ROW_TOKENS get no MLP chunks; packed ones (document masks) try varlen, measured faster
    there (length_mix_varlen_h100.md), and rank it first; one document a row keeps SDPA, whose cuDNN kernel was
    the faster on whole rows (train_speed_h100_varlen.md)."""
    for seq_len in (2048, LONG_ROW_TOKENS):
        packed = candidate_setups(gpu=GPUS["H100"], n_gpus=1, seq_len=seq_len)
        assert {(s.attention, s.mlp_chunk_tokens) for s in packed} == {("sdpa", 0), ("varlen", 0)}
        unpacked = candidate_setups(gpu=GPUS["H100"], n_gpus=1, seq_len=seq_len, document_mask=False)
        assert {(s.attention, s.mlp_chunk_tokens) for s in unpacked} == {("sdpa", 0)}
    top = plan(LLAMA_1B, gpu=GPUS["H100"], seq_len=2048, base_overrides=BASE, calibration=calibration)[0]
    assert (top.setup.attention, top.setup.mlp_chunk_tokens, top.setup.compile, top.setup.fused_loss) == (
        "varlen", 0, "model", True)


def test_long_rows_rank_varlen_first_at_equal_speed_and_chunks_only_when_needed(calibration):
    seq_len = 4 * LONG_ROW_TOKENS
    candidates = plan(LLAMA_1B, gpu=GPUS["H100"], seq_len=seq_len, micro_batch=1, base_overrides=BASE,
                      calibration=calibration)
    rank = {c.setup: i for i, c in enumerate(candidates)}
    for c in candidates:
        if c.setup.attention == "sdpa":
            twin = candidates[rank[c.setup.replace(attention="varlen")]]
            assert twin.speed.tokens_per_s == c.speed.tokens_per_s  # the speed model cannot tell them apart
            assert twin.memory.peak_bytes < c.memory.peak_bytes and rank[twin.setup] < rank[c.setup]
    chunked = [c for c in candidates if c.setup.mlp_chunk_tokens]
    assert chunked and all(c.speed.tokens_per_s < candidates[rank[c.setup.replace(mlp_chunk_tokens=0)]]
                           .speed.tokens_per_s for c in chunked)  # the MLP's matmuls run again
    # unpacked rows have no document mask: SDPA needs none, so no varlen
    unpacked = candidate_setups(gpu=GPUS["H100"], n_gpus=1, seq_len=seq_len, document_mask=False)
    assert {(s.attention, s.mlp_chunk_tokens) for s in unpacked} == {("sdpa", 0), ("sdpa", LONG_ROW_TOKENS)}


def test_cli_plans_half_a_million_tokens_into_a_config_that_loads(tmp_path, capsys, monkeypatch, measured):
    from optrush.cli.main import main
    from optrush.plan import speed

    monkeypatch.setattr(speed, "load_measurements", lambda: measured)  # already read once for this module
    out = tmp_path / "plan.yaml"
    code = main(["plan", "--model", "llama3.2-1b", "--gpus", "1xH100", "--seq", str(LONG), "--micro-batch", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "0 of" not in printed and "model.max_seq_len=524288" in printed
    tree = yaml.safe_load(out.read_text())
    assert tree["model"]["attention"] == "varlen" and tree["activations"]["mlp_chunk_tokens"] == LONG_ROW_TOKENS
    # the forward pass refuses rows longer than the RoPE tables: the written config raises them
    assert tree["model"]["max_seq_len"] == LONG and LLAMA_1B.max_seq_len < LONG
    cfg = load_config(out, synthetic_data=True)
    assert setup_from_config(cfg).attention == "varlen"


def test_oom_advice_offers_the_long_row_levers():
    long_rows = Setup(seq_len=4 * LONG_ROW_TOKENS, precision="bf16_pure", fused_loss=True, document_mask=True)
    changes = dict(advice_changes(long_rows))
    assert changes["model.attention=varlen"].attention == "varlen"
    assert changes[f"activations.mlp_chunk_tokens={LONG_ROW_TOKENS}"].mlp_chunk_tokens == LONG_ROW_TOKENS
    short = dict(advice_changes(long_rows.replace(seq_len=2048)))
    assert "model.attention=varlen" not in short and f"activations.mlp_chunk_tokens={LONG_ROW_TOKENS}" not in short


def test_gpus_without_a_name_say_the_name_is_missing():
    for spec in ("2x", "2", "2 x", "x"):
        with pytest.raises(ValueError, match="the GPU name is missing"):
            parse_gpus(spec)
    assert parse_gpus("4090") == (GPUS["4090"], 1) and parse_gpus("2x3090") == (GPUS["3090"], 2)  # numeric names


def test_max_context_report_says_the_peak_is_resident_memory_on_cpu():
    tries = [{"length": 1024, "fits": True, "tokens_per_s": 100.0, "peak_mem_gib": 1.5,
              "peak_mem_kind": "cpu_peak_rss"}, {"length": 2048, "fits": False, "reason": "timed out"}]
    result = {"max_length": 1024, "tokens_per_s": 100.0, "peak_mem_gib": 1.5, "reached_limit": False,
              "tries": tries}
    assert "peak GiB (cpu_peak_rss): peak resident memory" in markdown(result)


def test_ladder_loss_chart_has_whole_step_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from optrush.bench.report import plot_ladder

    ticks = {}
    save = Figure.savefig

    def spy(figure, path, *args, **kwargs):
        ticks[path.name] = list(figure.axes[0].get_xticks())
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    rung = {"name": "eager", "stack": "optrush", "status": "ok", "real_tokens_per_s": 10.0, "peak_mem_gib": 1.0,
            "losses": [2.0, 1.9, 1.8, 1.7]}
    plot_ladder({"rungs": [rung], "peers": []}, tmp_path)
    assert ticks["ladder_loss.png"] and all(float(t).is_integer() for t in ticks["ladder_loss.png"])


def test_measuring_a_varlen_candidate_on_cpu_reports_it_instead_of_stopping(calibration):
    from optrush.plan.measure import measure

    varlen = Setup(seq_len=64, precision="bf16_pure", attention="varlen", document_mask=True)
    candidate = evaluate(get_preset("debug"), varlen, gpu=GPUS["H100"], calibration=calibration)
    row, = measure([candidate], base_overrides=["model.preset=debug"], device="cpu", warmup=0, steps=1)
    assert "model.attention=varlen needs a CUDA GPU" in row["error"]


def test_varlen_keeps_grouped_kv_heads_where_masked_sdpa_keeps_repeated_copies():
    """varlen passes grouped KV heads to the kernel as they are (on torch 2.11 too: varlen_gqa_h100.md); SDPA with
    a dense document mask repeats them to the query heads, and autograd keeps the copies."""
    from optrush.plan import memory

    setup = Setup(precision="bf16_pure", micro_batch=1, seq_len=LONG_ROW_TOKENS, compile="model",
                  fused_loss=True, attention="varlen", document_mask=True)
    grouped = memory.activation_bytes(LLAMA_1B, setup)
    repeated = memory.activation_bytes(LLAMA_1B, setup.replace(attention="sdpa"))
    copies = 2 * (LLAMA_1B.n_heads - LLAMA_1B.n_kv_heads) * LLAMA_1B.head_dim * 2  # bytes a token per layer
    assert repeated - grouped == pytest.approx(copies * setup.tokens * LLAMA_1B.n_layers, rel=1e-6)
