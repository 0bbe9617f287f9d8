"""`sorted` packing keeps every example once and cuts less padding than `none`; `optrush data stats` reports every
strategy; `optrush data inspect` marks trained and masked tokens."""
import numpy as np

from optrush.data.pack import plan_batches
from optrush.data.stats import packing_stats


def test_sorted_plan_holds_each_example_once_in_length_sorted_batches():
    lengths = np.random.default_rng(0).integers(1, 200, size=101).tolist()
    plan = plan_batches(lengths, strategy="sorted", rows=4, max_length=256, order_seed=3)
    flat = [row[0] for micro in plan for row in micro]
    assert sorted(flat) == list(range(101)) and all(len(row) == 1 for micro in plan for row in micro)
    spans = sorted((min(lengths[r[0]] for r in m), max(lengths[r[0]] for r in m)) for m in plan)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))  # batches are length ranges
    assert plan != plan_batches(lengths, strategy="sorted", rows=4, max_length=256, order_seed=4)  # shuffled
    assert plan == plan_batches(lengths, strategy="sorted", rows=4, max_length=256, order_seed=3)  # repeatable


def test_packing_stats_compare_strategies():
    lengths = np.random.default_rng(1).lognormal(5, 0.7, size=2000).clip(1, 2048).astype(int).tolist()
    stats = {s["strategy"]: s for s in packing_stats(lengths, rows=8, max_length=2048, seed=0)}
    assert set(stats) == {"none", "sorted", "bfd"}
    assert stats["sorted"]["padding"] < stats["none"]["padding"] and stats["bfd"]["padding"] < 0.05
    assert stats["none"]["batches"] == stats["sorted"]["batches"] == 250 > stats["bfd"]["batches"]
    assert all(s["tokens"] == sum(lengths) for s in stats.values())
    budget = {s["strategy"]: s for s in packing_stats(lengths, rows=8, max_length=2048, seed=0, batch_tokens=8192)}
    assert budget["bfd"]["positions_per_batch"] <= 8192 and budget["none"]["positions_per_batch"] <= 8192
    assert budget["sorted"]["padding"] < budget["none"]["padding"]


def test_data_stats_and_inspect_commands(debug_overrides, capsys):
    from optrush.cli.main import main

    assert main(["data", "stats", *debug_overrides]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("none", "sorted", "bfd", "padding"))
    assert main(["data", "stats", *debug_overrides, "data.batch_tokens=256"]) == 0
    assert "data.batch_tokens=256" in capsys.readouterr().out
    assert main(["data", "inspect", *debug_overrides, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "example 0" in out and "trained" in out and "Recipe:" in out
    # captured, as piped output is: no colours, so brackets mark the trained completion (the recipe's body)
    assert "[[...]]: trained targets" in out and "Ingredients:" in out.split("[[", 2)[2].split("]]")[0]


def test_styled_example_marks_only_trained_targets(tokenizer_dir):
    from optrush.cli.data import styled_example
    from optrush.data.formats import build_example
    from optrush.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    prompt, completion = tok.encode("Recipe: Soup\n", add_special_tokens=False), tok.encode("Stir.",
                                                                                            add_special_tokens=False)
    example = build_example(prompt, completion, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    text = styled_example(example, tok)
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    masked = "".join(text.plain[s.start:s.end] for s in text.spans if "dim" in str(s.style))
    assert trained == "Stir." + tok.eos_token and masked == tok.bos_token + "Recipe: Soup\n"
