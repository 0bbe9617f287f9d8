"""benchmarks/length_mix.py on CPU: the peer's length mix, a corpus whose examples are exactly those lengths through
the real data pipeline, and GPU case configs that load (the GPU run itself is `python benchmarks/length_mix.py`)."""
import math

import pytest

from conftest import load_benchmark
from optrush.config import load_config
from optrush.data.dataset import build_datasets
from optrush.data.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def script():
    return load_benchmark("length_mix")


def test_peer_length_mix_matches_the_issue(script):
    lengths = script.peer_lengths()
    assert len(lengths) == 4000 and min(lengths) == 32 and max(lengths) == 2048
    assert abs(sum(lengths) / len(lengths) - 477) < 1  # issue #5: "lognormal lengths (mean 477, max 2048)"
    assert script.peer_lengths(scale=32)[:5] == [max(2, n // 32) for n in lengths[:5]]


def test_corpus_examples_have_exactly_the_drawn_lengths(script, tmp_path):
    lengths = [2, 7, 31, 64, 5]
    data_path, tokenizer_dir = script.write_corpus(tmp_path, lengths, vocab=300, seed=0)
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 300 and tokenizer.pad_token_id == 2
    cfg = load_config(None, [*script.common_overrides(script.SMOKE, data_path=data_path, tokenizer_dir=tokenizer_dir,
                                                      work=tmp_path), "data.cache_dir=null"])
    examples, _, _ = build_datasets(cfg.data, tokenizer, seed=0)
    assert [len(e) for e in examples] == lengths
    assert [e.num_trained for e in examples] == lengths  # every token trained, the EOS included
    assert all(3 <= t < 300 for e in examples for t in e.input_ids[1:])


def test_gpu_cases_are_valid_configs(script, tmp_path):
    common = script.common_overrides(script.GPU, data_path=tmp_path / "d.jsonl", tokenizer_dir=tmp_path, work=tmp_path)
    for name in script.GPU["cases"]:
        cfg = load_config(None, [*common, *script.CASES[name]])
        assert cfg.data.batch_tokens == 8192 and cfg.data.max_length == 2048, name
    lengths = script.peer_lengths()[:1000]
    fewest = math.ceil(sum(lengths) / 8192)  # micro-batches of 4 rows x 2048 with no padding at all
    assert fewest <= script.epoch_batches(lengths, packing="bfd", max_length=2048, batch_tokens=8192,
                                          seed=0) <= fewest * 1.02 + 1


def test_peer_record_and_speed_ratios(script, tmp_path):
    fake = tmp_path / "peer.py"  # writes what baseline-peers.py writes, without a GPU
    fake.write_text("import json, os, sys\n"
                    "section = sys.argv[1]\n"
                    "speed = {'lengthmix_random': 10000, 'lengthmix_sorted': 25000}.get(section)\n"
                    "record = {'gpu': 'fake', 'length_mix': {'mean': 476.5}}\n"
                    "record['hf_1b_' + section] = {'nonpad_tok_s': speed, 'pad_frac': 0.5, 'peak_gib': 9.0} "
                    "if speed else 'ERR RuntimeError()'\n"
                    "json.dump(record, open(os.path.join(os.environ['OUT'], 'peers.json'), 'w'))\n")
    peers = {name: script.run_peer(fake, f"lengthmix_{name}", timeout_s=60) for name in ("random", "sorted")}
    assert peers["random"]["status"] == "ok" and peers["random"]["nonpad_tok_s"] == 10000
    assert script.run_peer(fake, "lengthmix_other", timeout_s=60) == {"status": "failed",
                                                                      "reason": "ERR RuntimeError()"}

    def case(name, speed, losses, units):
        return {"name": name, "status": "ok", "real_tokens_per_s": speed, "losses": losses, "step_units": units}

    record = {"peers": peers, "cases": [case("padded_random", 20000, [2.0, 4.0], [1, 3]),
                                        case("bfd_varlen", 50000, [3.0, 4.0], [2, 1])]}
    summary = script.summarize(record, tolerance=0.1)
    assert summary["ratios"]["bfd_varlen"] == {"x padded_random": 2.5, "x HF random": 5.0, "x HF sorted": 2.0}
    # epoch losses (2 + 12) / 4 = 3.5 and (6 + 4) / 3 = 3.333: token-weighted, not a mean of step means
    assert summary["loss"]["bfd_varlen"]["delta_vs_padded"] == pytest.approx(10 / 3 - 3.5)
    assert not summary["loss"]["bfd_varlen"]["same_loss"] and summary["loss"]["padded_random"]["same_loss"]
    assert summary["target"] == {"case": "bfd_varlen", "x_hf_sorted": 2.0, "x_hf_padded": 5.0, "same_loss": False,
                                 "met": False}
