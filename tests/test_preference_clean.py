"""data.clean, data.num_proc and data.cache_dir on preference data (data.format=preference): cleaning rules drop
pairs and the report counts them, rules a pair cannot take are config errors, tokenizing over processes gives the
same pairs, and data.cache_dir caches them."""
import pytest

from optrush.config import ConfigError
from optrush.config.schema import DataCleanConfig, DataConfig
from optrush.data.preference import build_preference_datasets
from optrush.data.reader import DataError
from optrush.data.recipes import write_jsonl

GOOD = {"prompt": "Recipe: Soup\n", "chosen": "Boil the water, add salt.", "rejected": "Burn it."}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from optrush.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def pairs_config(tmp_path, records, **clean) -> DataConfig:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(records, path)
    return DataConfig(path=str(path), format="preference", clean=DataCleanConfig(**clean))


def test_clean_rules_drop_pairs_and_the_report_counts_each(tmp_path, tok):
    records = [GOOD, dict(GOOD),  # an exact duplicate triple
               {**GOOD, "chosen": "Boil the water, add pepper."},  # same prompt, another pair: kept
               {**GOOD, "rejected": "SPAM spam"},  # a pattern in one completion
               {**GOOD, "chosen": "Ok"},  # shorter than min_chars on the chosen side
               {**GOOD, "prompt": " "}]  # a blank prompt (data.clean.nonempty)
    cfg = pairs_config(tmp_path, records, drop_patterns=["SPAM"], nonempty=["prompt"], min_chars=len(GOOD["prompt"]) + 5,
                       dedup=True)
    train, _, report = build_preference_datasets(cfg, tok, seed=0)
    assert len(train) == 2
    assert report.train.dropped == {"pattern": 1, "empty": 1, "chars": 1, "duplicate": 1}
    text = report.format()
    assert "1 as duplicate (data.clean.dedup: the same prompt, chosen and rejected" in text
    assert "1 as pattern (data.clean.drop_patterns" in text and "1 as chars (data.clean.min_chars" in text


def test_token_bounds_judge_each_side_and_no_pairs_left_names_the_rule(tmp_path, tok):
    long_side = {**GOOD, "rejected": "Boil the water, " * 20}
    cfg = pairs_config(tmp_path, [GOOD, long_side], max_tokens=40)
    train, _, report = build_preference_datasets(cfg, tok, seed=0)
    assert len(train) == 1 and report.train.dropped == {"tokens": 1}
    with pytest.raises(DataError, match=r"all 2 pairs were dropped by data\.clean\.drop_patterns"):
        build_preference_datasets(pairs_config(tmp_path, [GOOD, long_side], drop_patterns=["Recipe"]), tok, seed=0)


@pytest.mark.parametrize("clean, key", [({"min_items": 2}, "data.clean.min_items"),
                                        ({"rare_min_count": 2}, "data.clean.rare_min_count"),
                                        ({"nonempty": ["title"]}, "data.clean.nonempty")])
def test_clean_rules_a_pair_cannot_take_are_config_errors(tmp_path, tok, clean, key):
    with pytest.raises(ConfigError, match=key):
        build_preference_datasets(pairs_config(tmp_path, [GOOD], **clean), tok, seed=0)


def test_num_proc_tokenizes_over_processes_with_the_same_pairs_and_counts(tmp_path, tok, monkeypatch):
    from optrush.data import preference

    records = [{**GOOD, "chosen": f"Boil {i} cups of water."} for i in range(40)] + [{**GOOD, "chosen": "Burn it."}]
    cfg = pairs_config(tmp_path, records, dedup=True)
    one, _, report_one = build_preference_datasets(cfg, tok, seed=0)
    processes, parallel_chunks = [], preference.parallel_chunks
    monkeypatch.setattr(preference, "parallel_chunks",
                        lambda *args, **kwargs: processes.append(kwargs["num_proc"]) or parallel_chunks(*args, **kwargs))
    cfg.num_proc = 2
    two, _, report_two = build_preference_datasets(cfg, tok, seed=0)
    assert processes == [2]
    assert [(p.chosen, p.rejected, p.shared) for p in one] == [(p.chosen, p.rejected, p.shared) for p in two]
    assert report_one.train.dropped == report_two.train.dropped == {"identical": 1}


def test_cache_dir_gives_the_same_pairs_and_counts_without_reading_again(tmp_path, tok, monkeypatch):
    from optrush.data import preference

    records = [{**GOOD, "chosen": f"Boil {i} cups of water."} for i in range(6)] + [{**GOOD, "chosen": "Burn it."}]
    for shared_prompt in (False, True):
        cfg = pairs_config(tmp_path, records, dedup=True)
        cfg.cache_dir, cfg.shared_prompt = str(tmp_path / "cache"), shared_prompt
        first, _, written = build_preference_datasets(cfg, tok, seed=0)
        assert "tokenized pairs saved to the cache" in written.format()
        with monkeypatch.context() as m:
            m.setattr(preference, "encode_source_pairs", lambda *a, **k: pytest.fail("read again on a cache hit"))
            again, _, hit = build_preference_datasets(cfg, tok, seed=0)
        assert "tokenized pairs loaded from the cache" in hit.format()
        assert [(p.chosen, p.rejected, p.shared) for p in first] == [(p.chosen, p.rejected, p.shared) for p in again]
        assert hit.train.dropped == written.train.dropped == {"identical": 1} and hit.tokens == written.tokens
