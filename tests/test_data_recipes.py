"""The synthetic recipe corpus (deterministic, coherent, with each kind of bad record) and the counted cleaning."""
import json
from collections import Counter
from itertools import islice

from optrush.data.clean import ExactDuplicates, NonEmpty, RareVocabulary, TooLong, clean_records
from optrush.data.recipes import INGREDIENTS, generate_recipes, recipe_completion, recipe_prompt, write_jsonl

KNOWN = {item[0] for item in INGREDIENTS}


def kinds_of(records):
    """Label each record: empty / duplicate / too_long / rare / good (as the generator documents them)."""
    seen, labels = set(), []
    counts = Counter(name for r in records for name in set(r["NER"]))
    for r in records:
        key = json.dumps(r, sort_keys=True)
        if not r["title"] or not r["directions"]:
            labels.append("empty")
        elif key in seen:
            labels.append("duplicate")
        elif len(r["directions"]) >= 200:
            labels.append("too_long")
        elif any(name not in KNOWN for name in r["NER"]):
            assert all(counts[name] == 1 for name in r["NER"] if name not in KNOWN)
            labels.append("rare")
        else:
            labels.append("good")
        seen.add(key)
    return labels


def test_generator_is_deterministic_and_streams(tmp_path):
    a = list(generate_recipes(300, seed=3))
    assert a == list(generate_recipes(300, seed=3))
    assert a != list(generate_recipes(300, seed=4))
    assert list(islice(generate_recipes(10**9, seed=3), 300)) == a  # lazy: a huge n costs nothing up front
    assert write_jsonl(iter(a), tmp_path / "r.jsonl") == 300
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == a


def test_generator_makes_every_bad_kind_and_coherent_good_records():
    records = list(generate_recipes(5000, seed=0))
    kinds = Counter(kinds_of(records))
    assert {"empty", "duplicate", "too_long", "rare"} <= set(kinds), kinds
    assert kinds["good"] > 0.97 * len(records)
    good = [r for r, k in zip(records, kinds_of(records)) if k == "good"]
    n_ingredients = Counter(len(r["ingredients"]) for r in good)
    assert min(n_ingredients) >= 2 and max(n_ingredients) >= 20  # a long tail
    for r in good[:500]:
        assert set(r) == {"title", "ingredients", "directions", "NER"}
        assert len(r["ingredients"]) == len(r["NER"])
        assert all(item.endswith(name) for item, name in zip(r["ingredients"], r["NER"]))
        text = " ".join(r["directions"])
        assert all(name in text for name in r["NER"]), "every ingredient is used by a step"
    frequency = Counter(name for r in good for name in r["NER"])
    assert frequency["salt"] > 5 * frequency["mint"]  # Zipf-like: common items dominate


def test_recipe_template():
    record = {"title": "Easy Soup", "ingredients": ["1 onion", "2 cups water"], "directions": ["Chop.", "Boil."],
              "NER": ["onion", "water"]}
    assert recipe_prompt(record) == "Recipe: Easy Soup\n"
    assert recipe_completion(record) == "Ingredients:\n- 1 onion\n- 2 cups water\nDirections:\n1. Chop.\n2. Boil."


def recipe(title, ner, steps=1):
    return {"title": title, "ingredients": [f"1 {n}" for n in ner], "directions": ["Stir."] * steps, "NER": ner}


def test_clean_counts_every_drop_per_rule():
    records = [recipe("A", ["salt", "sugar"]), recipe("B", ["salt", "sugar"]), recipe("", ["salt"]),
               recipe("A", ["salt", "sugar"]), recipe("C", ["salt"], steps=30), recipe("D", ["salt", "zorblax"]),
               recipe("E", ["sugar"]), {"title": "F", "ingredients": [], "directions": ["x"], "NER": []}]
    rules = [NonEmpty(), ExactDuplicates(), TooLong(max_steps=10), RareVocabulary(min_count=2)]
    kept, report = clean_records(records, rules=rules, keep_examples=1)
    assert [r["title"] for r in kept] == ["A", "B", "E"]
    assert report.dropped == {"empty": 2, "duplicate": 1, "too_long": 1, "rare_vocabulary": 1}
    assert report.total == 8 and report.kept == 3
    [empty] = report.examples["empty"]  # keep_examples=1; an empty title is shown by the record's JSON
    assert empty.startswith('{"title": "", "ingredients"') and empty.endswith(": 'title' is empty")
    assert report.examples["duplicate"] == ["'A': same as an earlier record"]
    assert "'zorblax' is in 1 record(s) < 2" in report.examples["rare_vocabulary"][0]
    text = report.format()
    for line in ("empty", "duplicate", "too_long", "rare_vocabulary", "kept 3 of 8 records (5 dropped)"):
        assert line in text
    assert report.as_dict()["dropped"]["too_long"] == 1


def test_default_rules_remove_every_bad_generated_record():
    records = list(generate_recipes(3000, seed=2))
    kept, report = clean_records(records)
    assert report.kept + sum(report.dropped.values()) == report.total == 3000
    assert all(report.dropped[name] > 0 for name in ("empty", "duplicate", "too_long", "rare_vocabulary"))
    assert set(kinds_of(kept)) == {"good"}
