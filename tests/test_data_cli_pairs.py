"""`optrush data stats` and `optrush data inspect` on preference data (objective=dpo/reward) read pairs as training
does: stats reports, per data.packing strategy, the batches the pair loader really yields; inspect shows each pair's
prompt once and both completions with the trained tokens marked."""
import pytest

from optrush.cli.main import main
from optrush.data.recipes import write_jsonl

STRATEGIES = ("none", "sorted", "bfd")


@pytest.fixture(scope="module")
def pair_records(recipe_corpus, tmp_path_factory):
    """(path of a preference JSONL of 25 short recipe pairs, the records)."""
    from optrush.data.preference import recipe_preference_pairs

    recipes = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:25]]
    records = recipe_preference_pairs(recipes, seed=0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(records, path)
    return path, records


@pytest.fixture
def pair_overrides(debug_overrides, pair_records):
    return [*debug_overrides, f"data.path={pair_records[0]}", "data.format=preference", "objective=dpo",
            "data.max_length=512", "train.micro_batch_size=3"]


def table_rows(out: str) -> dict[str, list[str]]:
    """The strategy rows of the stats table: strategy -> its cells."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in STRATEGIES:
            rows[cells[0]] = cells[1:]
    return rows


def one_epoch(loader) -> list:
    """The batches the loader yields for its first epoch."""
    batches = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return batches
        batches.append(batch)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_data_stats_reports_the_batches_the_pair_loader_yields(pair_overrides, shared_prompt, capsys):
    from optrush.config import load_config
    from optrush.data.preference import build_preference_datasets
    from optrush.data.tokenizer import load_tokenizer
    from optrush.train.loop import make_loader

    overrides = [*pair_overrides, f"data.shared_prompt={str(shared_prompt).lower()}"]
    assert main(["data", "stats", *overrides]) == 0
    out = capsys.readouterr().out
    assert "preference records" in out and "-> 25 train" in out  # the pair data report
    assert "pairs/batch" in out and f"data.shared_prompt={str(shared_prompt).lower()}" in out
    rows = table_rows(out)
    assert set(rows) == set(STRATEGIES)
    for strategy in STRATEGIES:
        cfg = load_config(None, [*overrides, f"data.packing={strategy}"])
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        train, _, _ = build_preference_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
        batches = one_epoch(make_loader(train, cfg, tokenizer.pad_token_id, shuffle=True))
        batch_count, pairs_per_batch, _, _, padding = rows[strategy]
        assert int(batch_count) == len(batches), strategy
        assert float(pairs_per_batch) == pytest.approx(sum(b.num_pairs for b in batches) / len(batches), abs=0.05)
        slots = sum(b.input_ids.numel() for b in batches)
        assert padding == f"{sum(b.num_padding for b in batches) / slots:.2%}", strategy


def test_data_inspect_shows_the_prompt_once_and_both_sides_marked(pair_overrides, pair_records, capsys):
    assert main(["data", "inspect", *pair_overrides, "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[...]]: trained targets" in out  # captured, as piped output is: brackets mark the trained text
    first, second = out.split("pair 0 (")[1].split("pair 1 (")
    assert "positions/trained: chosen " in first and ", rejected " in first
    for text, record in ((first, pair_records[1][0]), (second, pair_records[1][1])):
        prompt, sides = text.split("\nprompt:\n")[1].split("\nchosen:\n")
        chosen, rejected = (side.rstrip("─ \n") for side in sides.split("\nrejected:\n"))  # without the next rule
        assert record["prompt"].strip() in prompt and "[[" not in prompt  # the prompt is masked, shown once
        assert text.count(record["prompt"].strip()) == 1
        assert chosen.strip().startswith("[[" + record["chosen"][:12])  # each side trained from its first token
        assert rejected.strip().startswith("[[" + record["rejected"][:12])
        assert chosen.endswith("]]") and rejected.endswith("]]")
        assert record["chosen"].splitlines()[-1] in chosen and record["rejected"].splitlines()[-1] in rejected
