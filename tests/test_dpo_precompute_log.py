"""dpo.reference=precomputed says when it computes the reference log-probs (a forward pass over every pair, before
step 1), how long that took, and when it reads them from its cache instead."""
import re

from optrush.config.schema import DataConfig
from optrush.data.preference import build_preference_datasets, recipe_preference_pairs
from optrush.data.recipes import write_jsonl
from optrush.data.tokenizer import load_tokenizer
from optrush.models import build_model
from optrush.models.presets import get_preset
from optrush.objectives.dpo import precompute_reference_logps


def test_precomputing_reference_log_probs_is_announced_with_its_time_and_cache(recipe_corpus, tokenizer_dir,
                                                                              tmp_path, capsys):
    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:10]]
    write_jsonl(recipe_preference_pairs(records, seed=0), tmp_path / "pairs.jsonl")
    tok = load_tokenizer(tokenizer_dir)
    pairs, _, _ = build_preference_datasets(DataConfig(path=str(tmp_path / "pairs.jsonl"), max_length=512,
                                                       format="preference"), tok, seed=0)
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    cache = tmp_path / "run" / "reference_logps.pt"
    capsys.readouterr()
    for _ in range(2):
        precompute_reference_logps(model, pairs, cache=cache, pad_id=tok.pad_token_id, max_length=512, rows=4)
    what = re.escape(f"the reference model's log-probs of {len(pairs)} pairs (dpo.reference=precomputed)")
    at = re.escape(str(cache))
    assert re.fullmatch(rf"computing {what}\.\.\.\n"
                        rf"computed {what} in \d+\.\d s; cached in {at} for a rerun with the same pairs and starting "
                        r"weights\n"
                        rf"read {what} from {at}, written by an earlier run with the same pairs and starting weights\n",
                        capsys.readouterr().out)
    assert [p.name for p in cache.parent.iterdir()] == ["reference_logps.pt"]  # written whole: no partial file left


def test_only_the_main_rank_writes_the_reference_cache(recipe_corpus, tokenizer_dir, tmp_path, monkeypatch):
    """Every rank computes the same table; all of them writing one file at once could leave it corrupt."""
    import optrush.objectives.dpo as dpo

    write_jsonl(recipe_preference_pairs(recipe_corpus[1][:4], seed=0), tmp_path / "pairs.jsonl")
    tok = load_tokenizer(tokenizer_dir)
    pairs, _, _ = build_preference_datasets(DataConfig(path=str(tmp_path / "pairs.jsonl"), max_length=512,
                                                       format="preference"), tok, seed=0)
    model = build_model(get_preset("debug", vocab_size=len(tok)), seed=0)
    monkeypatch.setattr(dpo, "is_main", lambda: False)
    table = precompute_reference_logps(model, pairs, cache=tmp_path / "run" / "reference_logps.pt",
                                       pad_id=tok.pad_token_id, max_length=512, rows=4)
    assert table.shape[1] == 2 and not (tmp_path / "run").exists()
