"""Data parallelism on CPU processes over gloo: FSDP2 and DDP train exactly what one process trains on the same
global batch, DCP checkpoints resume on another world size (and strategy), and the final export is one HF model.

Distributed start-up is slow, so the runs are shared: one FSDP run on 2 ranks launched the way users launch it
(`python -m optrush train ... --nproc 2`, i.e. through torchrun), one single-process run with twice the gradient
accumulation (the same global batch), and resumes of the FSDP run's step-2 checkpoint at world 1 (no process group)
and at world 2 under DDP (ranks forked from this process, which has torch imported already).
"""
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import lift_float8_device_check
from optrush.config import ConfigError, load_config
from optrush.config.schema import DPOConfig, GRPOConfig
from optrush.data.loader import BatchLoader
from optrush.data.examples import Example
from optrush.models.io import load_model
from optrush.objectives import DPO, GRPO, RewardModel
from optrush.parallel import distributed
from optrush.train import train

STEPS = 4


@pytest.fixture(scope="module")
def overrides(recipe_corpus, tokenizer_dir, tmp_path_factory):
    """fp32 debug-model SFT, 2 rows per micro-batch, a checkpoint every 2 steps."""
    records = tmp_path_factory.mktemp("dist_data") / "recipes.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in recipe_corpus[1][:120]))
    return [f"data.path={records}", f"data.tokenizer={tokenizer_dir}", "model.preset=debug", "objective=sft",
            "data.format=recipe", "data.max_length=128", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
            "train.lr=1e-2", "train.device=cpu", "logging.progress=false", "checkpoint.resume=never",
            "data.prefetch=0", "checkpoint.every=2", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def fsdp_run(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "optrush", "train", *overrides, f"output_dir={out}",
                           "parallel.strategy=fsdp", "--nproc", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step 1/") == 1, "only rank 0 prints"
    return out


@pytest.fixture(scope="module")
def single_run(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    summary = train(load_config(None, overrides + [f"output_dir={out}", "train.grad_accum=2"]))
    return out, summary


def logged(run_dir, key: str = "loss") -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record[key] for record in map(json.loads, lines) if key in record]


def test_fsdp_on_two_ranks_equals_one_process_on_the_same_global_batch(fsdp_run, single_run):
    single_dir, summary = single_run
    assert logged(fsdp_run) == pytest.approx(summary["losses"], rel=1e-6, abs=0)
    assert logged(fsdp_run, "grad_norm") == pytest.approx(logged(single_dir, "grad_norm"), rel=1e-5, abs=0)
    assert logged(fsdp_run, "trained_tokens") == logged(single_dir, "trained_tokens")  # global counts
    assert json.loads((fsdp_run / "summary.json").read_text())["tokens_seen"] == summary["tokens_seen"]
    # the consolidated export: one HF checkpoint with the same weights the single process trained
    sharded, plain = load_model(fsdp_run / "final"), load_model(single_dir / "final")
    assert list((fsdp_run / "final").glob("*.safetensors")) == [fsdp_run / "final" / "model.safetensors"]
    for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


def test_consolidated_export_loads_in_transformers(fsdp_run):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(fsdp_run / "final", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, load_model(fsdp_run / "final")(ids), atol=1e-5)


def test_dcp_checkpoint_resumes_in_one_process(fsdp_run, overrides, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "step_00000002"
    assert (checkpoint / "dcp" / ".metadata").is_file() and (checkpoint / "rank_00001.pt").is_file()
    with warnings.catch_warnings():  # not told that one process is "assumed": it is what the user asked for
        warnings.filterwarnings("error", message="torch.distributed is .*single process")
        summary = train(load_config(None, overrides + [f"output_dir={tmp_path}", "train.grad_accum=2",
                                                       f"checkpoint.resume={checkpoint}"]))
    assert summary["losses"] == pytest.approx(logged(fsdp_run), rel=1e-6, abs=0)
    assert logged(tmp_path) == pytest.approx(logged(fsdp_run)[2:], rel=1e-6, abs=0)


@pytest.mark.parametrize("strategy", ["parallel.strategy=ddp", "parallel.strategy=hsdp parallel.replicate=2"])
def test_dcp_checkpoint_resumes_on_two_ranks_with_another_strategy(strategy, fsdp_run, overrides, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "step_00000002"
    run_ranks(overrides + [f"output_dir={tmp_path}", *strategy.split(), f"checkpoint.resume={checkpoint}"],
              world=2)
    assert logged(tmp_path) == pytest.approx(logged(fsdp_run)[2:], rel=1e-6, abs=0)
    assert load_model(tmp_path / "final").state_dict().keys() == load_model(fsdp_run / "final").state_dict().keys()


def test_fsdp_composes_with_lora_checkpointing_and_fused_loss(overrides, tmp_path):
    """LoRA (frozen base and adapters in one FSDP unit), activation checkpointing and the fused loss under FSDP
    on 2 ranks equal one process; the final export holds the merged model and the PEFT adapter."""
    common = overrides + ["peft.method=lora", "peft.r=4", "kernels.fused_loss=true", "kernels.loss_chunk_tokens=64",
                          "train.max_steps=2", "checkpoint.every=0"]
    run_ranks(common + [f"output_dir={tmp_path / 'fsdp'}", "parallel.strategy=fsdp",
                        "activations.checkpointing=full"], world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=1e-6, abs=0)
    merged, reference = load_model(tmp_path / "fsdp" / "final"), load_model(tmp_path / "single" / "final")
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert (tmp_path / "fsdp" / "final" / "adapter" / "adapter_config.json").is_file()


def test_low_bit_adamw_under_fsdp_equals_one_process_and_resumes(overrides, tmp_path):
    """optim.name=adamw8bit on 2 FSDP ranks: every debug-model tensor is under optim.low_bit_min_numel, so each
    rank steps its DTensor shards together (optrush.optim.low_bit); equal to one process, and the DCP checkpoint
    resumes in one process."""
    common = overrides + ["optim.name=adamw8bit", "optim.weight_decay=0.01"]
    run_ranks(common + [f"output_dir={tmp_path / 'fsdp'}", "parallel.strategy=fsdp"], world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2",
                                               "checkpoint.every=0"]))
    assert logged(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=1e-6, abs=0)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000002"
    train(load_config(None, common + [f"output_dir={tmp_path / 'resumed'}", "train.grad_accum=2",
                                      f"checkpoint.resume={checkpoint}", "checkpoint.every=0"]))
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "fsdp")[2:], rel=1e-6, abs=0)


def test_fp8_pure_under_fsdp_equals_one_process(overrides, tmp_path, monkeypatch):
    """Float8 block linears over bf16 weights on 2 FSDP ranks (each rank casts its all-gathered weights) train
    what one process trains on the same global batch; CPU float8 as in tests/test_transforms.py. Not bit-equal:
    one process accumulates its two micro-batches' gradients in the bf16 weights' dtype, the ranks reduce theirs
    in fp32 (measured 1.4e-5 relative at step 2; training on one rank's half of the batch, as a rank that skipped
    the reduction would, is 1.6e-3 off)."""
    lift_float8_device_check(monkeypatch)  # the ranks fork from this process and keep the lifted check
    common = overrides + ["precision.mode=fp8_pure", "train.max_steps=2", "checkpoint.every=0", "train.lr=1e-3"]
    run_ranks(common + [f"output_dir={tmp_path / 'fsdp'}", "parallel.strategy=fsdp"], world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=2e-4, abs=0)


class TwoRanks:
    """`all_reduce_sum` for two threads standing in for two ranks: each gets the element-wise sum of both ranks'
    values. A rank that skips the collective breaks the barrier (a real run would hang), one that sends another
    number of values fails the strict zip."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=10)
        self.sent = {}

    def all_reduce_sum(self, values, *, device):
        self.sent[threading.get_ident()] = list(values)
        self.barrier.wait()
        return [sum(column) for column in zip(*self.sent.values(), strict=True)]


def on_two_ranks(monkeypatch, *calls):
    """The results of `calls[r]()` run at once by thread r, with `all_reduce_sum` summing over the two."""
    monkeypatch.setattr(distributed, "all_reduce_sum", TwoRanks().all_reduce_sum)
    results, errors = [None, None], []

    def rank_main(rank):
        try:
            results[rank] = calls[rank]()
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_sum_over_ranks_matches_keys_not_their_order(monkeypatch):
    sums = partial(distributed.sum_over_ranks, device=torch.device("cpu"))
    assert sums({"pairs": 2}) == {"pairs": 2}  # one process
    assert on_two_ranks(monkeypatch, lambda: sums({"pairs": 2, "correct": 1}),
                        lambda: sums({"correct": 3, "pairs": 4})) == [{"correct": 4, "pairs": 6}] * 2


@pytest.mark.parametrize("make", [RewardModel, lambda: DPO(cfg=DPOConfig(loss="simpo")),
                                  lambda: GRPO(cfg=GRPOConfig(kl_beta=0.0), tokenizer=None, reference=None,
                                               rewards=[len])])
def test_objective_metrics_are_over_every_ranks_batches(make, monkeypatch):
    """Both ranks log the means of both ranks' sums, those one process holding all the batches logs; a rank that
    saw no batch since the last log still enters the all-reduce, with zeros under the same keys."""
    sums = partial(distributed.sum_over_ranks, device=torch.device("cpu"))
    rank0, rank1, one_process = make(), make(), make()
    for i, key in enumerate(rank0.TOTALS, start=1):
        rank0.totals[key], rank1.totals[key], one_process.totals[key] = i, i * i, i + i * i
    expected = one_process.pop_metrics()
    assert on_two_ranks(monkeypatch, lambda: rank0.pop_metrics(sums),
                        lambda: rank1.pop_metrics(sums)) == [expected] * 2
    for i, key in enumerate(rank0.TOTALS, start=1):  # rank 1 sees nothing this time
        rank0.totals[key] = one_process.totals[key] = i
    expected = one_process.pop_metrics()
    assert on_two_ranks(monkeypatch, lambda: rank0.pop_metrics(sums),
                        lambda: rank1.pop_metrics(sums)) == [expected] * 2


def test_loader_position_converts_between_world_sizes():
    examples = [Example(input_ids=list(range(n)), labels=list(range(n))) for n in range(3, 40)]
    settings = dict(strategy="sorted", rows=2, max_length=64, pad_id=0, seed=3)
    whole = BatchLoader(examples, **settings)
    stream = [next(whole).input_ids for _ in range(8)]
    ranks = [BatchLoader(examples, **settings, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):  # two steps of one micro-batch per rank: the stream's first four
        for loader in ranks:
            next(loader)
    resumed = BatchLoader(examples, **settings)
    resumed.load_state_dict(ranks[1].state_dict())
    assert all(torch.equal(next(resumed).input_ids, expected) for expected in stream[4:])
    odd = BatchLoader(examples, **settings)
    next(odd)
    with pytest.raises(ValueError, match="cannot split"):
        ranks[0].load_state_dict(odd.state_dict())


@pytest.mark.parametrize("override, message", [
    ("parallel.strategy=hsdp", "replicate >= 2"),
    ("parallel.replicate=2", "hsdp only"),
    ("parallel.cpu_offload=true", "fsdp or hsdp"),
])
def test_invalid_parallel_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=debug", "data.tokenizer=x", override])


def test_strategy_without_torchrun_says_how_to_launch(overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="--nproc"):
        train(load_config(None, overrides + [f"output_dir={tmp_path}", "parallel.strategy=fsdp"]))


def test_nproc_needs_a_parallel_strategy(overrides, capsys):
    from optrush.cli.main import main

    assert main(["train", *overrides, "--nproc", "2"]) == 2
    assert "parallel.strategy=fsdp" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- ranks forked from here

def run_ranks(overrides: list[str], *, world: int, timeout_s: float = 180, target=None, args: tuple = ()) -> None:
    """Train with `overrides` on `world` processes forked from this one (torch already imported: fast start);
    each runs `target(rank, world, port, overrides, *args)` (default `rank_main`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=target or rank_main, args=(rank, world, port, overrides, *args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout_s)
    hung = [p for p in processes if p.exitcode is None]
    for process in hung:
        process.kill()
    assert not hung and all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]


def rank_main(rank: int, world: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(load_config(None, overrides))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_context_parallel_on_two_ranks_equals_one_process(strategy, overrides, tmp_path):
    """Ring attention (context.degree=2): both ranks hold half of every row (zigzag) and read the same rows, so
    the run equals one process on the whole rows, loss for loss and weight for weight. Under fsdp the two ranks
    also shard the weights, and the reduce-scatter's average over them must still give the whole row's gradient."""
    common = overrides + ["data.packing=none", "train.max_steps=2", "checkpoint.every=0", "data.eval_fraction=0.1",
                          "train.eval_batches=2"]
    run_ranks(common + [f"output_dir={tmp_path / 'cp'}", f"parallel.strategy={strategy}", "context.degree=2"],
              world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}"]))
    assert logged(tmp_path / "cp") == pytest.approx(single["losses"], rel=1e-5, abs=0)
    # Adam would hide a gradient off by a constant factor (a wrong normalization over the ranks); the norm does not
    assert logged(tmp_path / "cp", "grad_norm") == pytest.approx(logged(tmp_path / "single", "grad_norm"), rel=1e-4)
    assert logged(tmp_path / "cp", "eval_loss") == pytest.approx([single["eval_loss"]], rel=1e-5, abs=0)
    ring, reference = load_model(tmp_path / "cp" / "final"), load_model(tmp_path / "single" / "final")
    # Adam turns the attention's fp32 reordering noise in near-zero gradients into weight changes of a few 1e-5;
    # a wrong gradient (a missing half, a double count) moves weights by about train.lr = 1e-2
    for (name, a), (_, b) in zip(ring.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-4), name
    with pytest.raises(ConfigError, match="parallel.strategy=ddp"):
        load_config(None, common + ["context.degree=2"])


@pytest.mark.parametrize("objective, strategy", [("dpo", "fsdp"), ("reward", "ddp"), ("reward", "fsdp")])
def test_pairwise_objective_on_two_ranks_equals_one_process(objective, strategy, overrides, recipe_corpus, tmp_path):
    """Pairwise objectives: units are pairs, counted over both ranks; DPO's frozen-copy reference stays unsharded,
    the reward model's scalar head is sharded or replicated with the rest. The objective's metrics (accuracy, reward
    gap or margin), in training and evaluation, are over the pairs of both ranks, as the loss is."""
    from optrush.data.preference import recipe_preference_pairs

    records = [{**r, "ingredients": r["ingredients"][:2], "directions": r["directions"][:2]}
               for r in recipe_corpus[1][:40]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in recipe_preference_pairs(records, seed=0)))
    common = [o for o in overrides if not o.startswith(("data.path", "data.format", "objective", "data.max_length"))]
    common += [f"data.path={pairs}", "data.format=preference", f"objective={objective}", "data.max_length=256",
               "train.max_steps=2", "checkpoint.every=0", "train.lr=1e-3", "data.eval_fraction=0.25",
               "train.eval_batches=2"]
    run_ranks(common + [f"output_dir={tmp_path / strategy}", f"parallel.strategy={strategy}"], world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / strategy) == pytest.approx(single["losses"], rel=1e-6, abs=0)
    assert logged(tmp_path / strategy, "trained_pairs") == logged(tmp_path / "single", "trained_pairs") != []
    metrics = ["accuracy", "reward_gap"] if objective == "reward" else \
        ["accuracy", "reward_margin", "chosen_reward", "rejected_reward"]
    for name in ["eval_loss"] + metrics + [f"eval_{name}" for name in metrics]:
        expected = logged(tmp_path / "single", name)
        assert expected, name
        assert logged(tmp_path / strategy, name) == pytest.approx(expected, rel=1e-5, abs=1e-6), name


def decode_on_rank(rank: int, world: int, port: int, _overrides, out: str, stop_together: bool) -> None:
    """Rank 0's only row ends at its first token (EOS = the token it picks); rank 1 decodes all 6. Writes how many
    forward passes each rank ran."""
    import torch.distributed as dist

    from optrush.generate.decode import generate_batch
    from optrush.models.io import build_model
    from optrush.models.presets import get_preset

    torch.set_num_threads(1)  # as rank_main: a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build_model(get_preset("debug"), seed=0)
    first = generate_batch(model, [[5, 6, 7]], max_new_tokens=1, temperature=0)[0][0]  # greedy
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    generate_batch(model, [[5, 6, 7]], max_new_tokens=6, temperature=0, eos_id=first if rank == 0 else -1,
                   stop_together=stop_together)
    Path(out, f"rank{rank}").write_text(str(len(calls)))
    dist.destroy_process_group()


@pytest.mark.parametrize("stop_together", [False, True])
def test_decoding_stops_together_on_every_rank(stop_together, tmp_path):
    """Sharded weights make every forward a collective: with stop_together a rank whose rows are done keeps
    stepping until every rank's are, so all ranks run the same number of forward passes."""
    run_ranks([], world=2, target=decode_on_rank, args=(str(tmp_path), stop_together))
    calls = [int((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert calls == ([6, 6] if stop_together else [1, 6])


def test_samples_during_training_under_fsdp_equal_one_process(overrides, tmp_path):
    """train.sample_every on a sharded model: every rank decodes (each forward all-gathers), rank 0 logs."""
    common = overrides + ["train.max_steps=2", "checkpoint.every=0", "train.sample_every=2",
                          "train.sample_prompts=['Recipe: Soup']", "train.sample_max_new_tokens=4",
                          "checkpoint.save_final=false"]
    run_ranks(common + [f"output_dir={tmp_path / 'fsdp'}", "parallel.strategy=fsdp"], world=2)
    train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / "fsdp", "sample_0") == logged(tmp_path / "single", "sample_0") != []


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_trains_on_two_ranks_with_a_sampling_seed_per_rank(strategy, overrides, tmp_path):
    common = overrides + ["objective=grpo", "data.packing=none", "grpo.group_size=2", "grpo.max_new_tokens=4",
                          "train.max_steps=2", "checkpoint.every=0", "train.micro_batch_size=1",
                          "grpo.rewards=[test_objectives_grpo:vowel_share]", "checkpoint.save_final=false"]
    run_ranks(common + [f"output_dir={tmp_path}", f"parallel.strategy={strategy}"], world=2)
    losses = logged(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert logged(tmp_path, "grad_norm")[0] > 0


def test_qlora_under_ddp_equals_one_process_and_resumes(overrides, tmp_path):
    """QLoRA (NF4 base, replicated on every rank) under DDP: the same losses as one process, and its DCP checkpoint
    resumes in one process with the same continuation."""
    common = overrides + ["peft.method=lora", "peft.r=4", "peft.quantize=nf4", "peft.save=adapter"]
    run_ranks(common + [f"output_dir={tmp_path / 'ddp'}", "parallel.strategy=ddp"], world=2)
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / "ddp") == pytest.approx(single["losses"], rel=1e-6, abs=0)
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    resumed = train(load_config(None, common + [f"output_dir={tmp_path / 'resumed'}", "train.grad_accum=2",
                                                f"checkpoint.resume={checkpoint}"]))
    assert resumed["losses"] == pytest.approx(single["losses"], rel=1e-6, abs=0)
    assert (tmp_path / "ddp" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def qlora_rank_main(rank: int, world: int, port: int, overrides: list[str], out) -> None:
    """`rank_main` that also records, right after sharding, the bytes of quantized storage this rank holds."""
    from optrush.peft.quant import QuantizedWeight
    from optrush.train import loop

    shard = loop.apply_optimizations

    def recorded(model, cfg):
        model = shard(model, cfg)
        stored = [t for m in model.modules() if isinstance(m, QuantizedWeight) for t in m.parameters()]
        held = {"local": sum(t.to_local().nbytes for t in stored), "whole": sum(t.nbytes for t in stored)}
        (out / f"rank{rank}.json").write_text(json.dumps(held))
        return model

    loop.apply_optimizations = recorded
    rank_main(rank, world, port, overrides)


@pytest.mark.parametrize("method, precision, strategy, shards", [
    ("nf4", "fp32", "parallel.strategy=fsdp", 2),
    ("int8", "bf16_mixed", "parallel.strategy=fsdp", 2),
    ("nf4", "fp32", "parallel.strategy=hsdp parallel.replicate=2", 1),  # 2 replicas of 1 shard: the HSDP path
])
def test_qlora_under_fsdp_shards_the_quantized_base_and_equals_one_process(method, precision, strategy, shards,
                                                                           overrides, tmp_path):
    """QLoRA under FSDP2 on 2 ranks: each rank holds 1/shards of the quantized base's integer storage, the losses
    and the merged export equal one process on the same global batch, and the DCP checkpoint holds only the
    adapters. bf16_mixed: FSDP2 gathers the adapters in bf16 (the single process autocasts them), never the codes."""
    import torch.distributed.checkpoint as dcp

    common = overrides + ["peft.method=lora", "peft.r=4", f"peft.quantize={method}", "peft.save=both",
                          "train.max_steps=2", f"precision.mode={precision}"]
    run_ranks(common + [f"output_dir={tmp_path / 'fsdp'}", *strategy.split()], world=2,
              target=qlora_rank_main, args=(tmp_path,))
    single = train(load_config(None, common + [f"output_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    assert logged(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=1e-6 if precision == "fp32" else 1e-3,
                                                      abs=0)
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert held[0]["whole"] == held[1]["whole"] > 0
    assert sum(h["local"] for h in held) >= held[0]["whole"]  # every byte is on some rank (dim 0 padded)
    for h in held:
        assert h["local"] == pytest.approx(h["whole"] / shards, rel=0.05)
    merged, reference = load_model(tmp_path / "fsdp" / "final"), load_model(tmp_path / "single" / "final")
    assert merged.state_dict().keys() == reference.state_dict().keys()
    # weights only in fp32: Adam turns bf16 rounding noise in near-zero adapter gradients into steps of about lr
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items()):
        assert precision != "fp32" or torch.allclose(a, b, rtol=0, atol=1e-6), name
    saved = dcp.FileSystemReader(tmp_path / "fsdp" / "checkpoints" / "step_00000002" / "dcp").read_metadata()
    weights = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert weights and all("lora_" in key for key in weights), weights
