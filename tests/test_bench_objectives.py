"""`optrush bench` with the pairwise objectives times the training loop's own step on preference pairs (the loss
equals the loop's first loss), on synthetic pairs too; GRPO is refused at start-up, before any model is built,
on every bench path."""
import math

import pytest

import optrush.bench.run as bench_run
from optrush.bench.run import bench
from optrush.cli.main import main
from optrush.config import ConfigError, load_config
from optrush.train import train

ROWS, LENGTH = 2, 256


def pair_config(debug_overrides, short_pairs_file, objective, *extra):
    return load_config(None, [*debug_overrides, f"data.path={short_pairs_file}", f"objective={objective}",
                              "data.format=preference", "data.packing=bfd", f"data.max_length={LENGTH}",
                              f"train.micro_batch_size={ROWS}", "train.max_steps=1", "compile.mode=none", *extra])


def tokens_counted(result: dict) -> float:
    return result["tokens_per_s"] * result["step_s"] * result["steps"]


@pytest.mark.parametrize("objective, extra", [("reward", []), ("dpo", []), ("dpo", ["dpo.reference=precomputed"])])
def test_bench_on_real_pairs_measures_the_loops_first_step(debug_overrides, short_pairs_file, objective, extra):
    cfg = pair_config(debug_overrides, short_pairs_file, objective, *extra)
    result = bench(cfg, synthetic=False, warmup=0, steps=1)
    first_loss = train(cfg)["losses"][0]  # the same config: the loop's own first step
    assert result["losses"][0] == pytest.approx(first_loss, rel=1e-5)
    assert math.isfinite(result["loss"]) and result["tokens_per_s"] > 0
    assert result["step_units"][0] > ROWS  # packed pairs, several a row
    # every position of the packed rows is counted, chosen and rejected sides both
    assert tokens_counted(result) == pytest.approx(ROWS * LENGTH)
    if objective == "dpo":  # the first step's policy is the reference
        assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("objective, extra", [("reward", []), ("dpo", []), ("dpo", ["data.shared_prompt=true"])])
def test_bench_on_synthetic_pairs(objective, extra):
    cfg = load_config(None, ["model.preset=debug", "train.device=cpu", f"objective={objective}",
                             "data.format=preference", "data.max_length=64", "train.micro_batch_size=2",
                             "train.grad_accum=2", *extra], synthetic_data=True)
    result = bench(cfg, synthetic=True, warmup=0, steps=2)
    assert result["synthetic"] and result["tokens_per_s"] > 0 and all(math.isfinite(x) for x in result["losses"])
    assert result["step_units"] == [4, 4]  # one pair a row
    assert tokens_counted(result) == pytest.approx(2 * 2 * 2 * 64)
    if not extra:
        assert result["padding_fraction"] == 0  # each pair fills its row
    if objective == "dpo":
        assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-4)


GRPO = ["model.preset=debug", "train.device=cpu", "objective=grpo", "data.format=prompt_completion",
        "data.packing=none"]


def test_bench_refuses_grpo_before_building_anything(monkeypatch):
    monkeypatch.setattr(bench_run, "build", lambda *a, **kw: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=r"objective=grpo: optrush bench times .*reward, dpo.*optrush train"):
        bench(load_config(None, GRPO, synthetic_data=True), synthetic=True, warmup=0, steps=1)


@pytest.mark.parametrize("path", [["--synthetic"], ["--synthetic", "--ladder", "default"], ["--max-context"]])
def test_every_bench_path_refuses_grpo_at_start_up(tmp_path, capsys, path):
    assert main(["bench", *GRPO, f"output_dir={tmp_path}", *path]) == 2
    assert "objective=grpo: optrush bench times" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no rung, try or report was started


def test_bench_peers_refuse_a_pairwise_objective(tmp_path, capsys):
    assert main(["bench", "model.preset=debug", "train.device=cpu", "objective=dpo", "data.format=preference",
                 f"output_dir={tmp_path}", "--synthetic", "--peers", "hf_default"]) == 2
    assert "--peers with objective=dpo" in capsys.readouterr().err
