"""Packing and loading invariants: every trained token exactly once, documents never mix, resume == uninterrupted."""
from collections import Counter

import numpy as np
import pytest
import torch

from optrush.data.batch import IGNORE_INDEX
from optrush.data.formats import build_example
from optrush.data.loader import BatchLoader
from optrush.data.pack import collate, plan_batches

BOS, EOS, PAD = 1, 2, 0


def lognormal_lengths(n: int, *, median: float, sigma: float, max_length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 1, max_length).astype(int).tolist()


def make_examples(lengths: list[int], *, seed: int = 0):
    """Examples of the given lengths with random tokens and a random masked prompt (like prompt/completion)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        tokens = torch.randint(3, 500, (n,), generator=g).tolist()  # [bos] + tokens[:-1] are the n inputs
        prompt = int(torch.randint(0, n, (1,), generator=g))
        examples.append(build_example(tokens[:prompt], tokens[prompt:n - 1], bos_id=BOS, eos_id=EOS))
    assert [len(e) for e in examples] == lengths
    return examples


def documents(batch):
    """(input_ids, labels, position_ids) of every document in a collated batch, checking the layout rules."""
    found = []
    for b in range(batch.input_ids.shape[0]):
        ids, labels, pos = batch.input_ids[b], batch.labels[b], batch.position_ids[b]
        if batch.document_ids is None:
            n = int(batch.attention_lengths[b])
            assert (ids[n:] == PAD).all() and (labels[n:] == IGNORE_INDEX).all()
            found.append((ids[:n].tolist(), labels[:n].tolist(), pos[:n].tolist()))
            continue
        docs = batch.document_ids[b]
        assert docs.dtype == torch.int32
        real = docs >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        assert (ids[n:] == PAD).all() and (labels[n:] == IGNORE_INDEX).all()
        if n == 0:  # a row of padding only: what fills up the last packed micro-batch
            continue
        starts = [0] + [t for t in range(1, n) if docs[t] != docs[t - 1]]
        assert docs[:n].unique_consecutive().tolist() == list(range(len(starts))), "ids 0..k-1 in order"
        for start, end in zip(starts, starts[1:] + [n]):
            found.append((ids[start:end].tolist(), labels[start:end].tolist(), pos[start:end].tolist()))
    for ids, labels, pos in found:
        assert pos == list(range(len(ids))), "positions restart at 0 for every document"
        # labels never cross documents: each target is the document's own next input token (or its EOS at the end)
        assert all(label in (IGNORE_INDEX, nxt) for label, nxt in zip(labels, ids[1:]))
        assert labels[-1] == EOS
    return found


def test_bfd_plan_places_every_example_once_with_little_padding():
    max_length, rows = 512, 4
    lengths = lognormal_lengths(3000, median=90, sigma=0.8, max_length=max_length)
    plan = plan_batches(lengths, strategy="bfd", rows=rows, max_length=max_length, order_seed=7)
    placed = [i for micro in plan for row in micro for i in row]
    assert sorted(placed) == list(range(len(lengths)))
    # one shape for every micro-batch (a compiled model never recompiles): the last is filled with empty rows
    assert all(len(micro) == rows for micro in plan) and all(all(micro) for micro in plan[:-1]) and plan[-1][0]
    assert all(sum(lengths[i] for i in row) <= max_length for micro in plan for row in micro)
    n_rows = sum(1 for micro in plan for row in micro if row)
    padding = 1 - sum(lengths) / (n_rows * max_length)
    print(f"bfd padding on a lognormal length mix: {padding:.2%} over {n_rows} rows")
    assert padding < 0.02
    # another seed packs other neighbours into the same number of rows
    other = plan_batches(lengths, strategy="bfd", rows=rows, max_length=max_length, order_seed=8)
    assert sum(1 for m in other for row in m if row) == n_rows and other != plan
    assert plan == plan_batches(lengths, strategy="bfd", rows=rows, max_length=max_length, order_seed=7)


def test_none_plan_is_consecutive_or_a_seeded_permutation():
    lengths = [3, 5, 2, 7, 1, 4, 4]
    assert plan_batches(lengths, strategy="none", rows=3, max_length=8, order_seed=None) == [
        [[0], [1], [2]], [[3], [4], [5]], [[6]]]
    shuffled = plan_batches(lengths, strategy="none", rows=3, max_length=8, order_seed=1)
    assert sorted(row[0] for micro in shuffled for row in micro) == list(range(7))
    with pytest.raises(ValueError, match="1..8"):
        plan_batches([3, 9], strategy="bfd", rows=2, max_length=8, order_seed=None)


@pytest.mark.parametrize("strategy", ["bfd", "none", "sorted"])
def test_collated_batches_hold_each_example_exactly_once(strategy):
    max_length = 64
    lengths = lognormal_lengths(200, median=12, sigma=0.7, max_length=max_length, seed=1)
    examples = make_examples(lengths)
    plan = plan_batches(lengths, strategy=strategy, rows=3, max_length=max_length, order_seed=0)
    seen = []
    for micro in plan:
        batch = collate([[examples[i] for i in row] for row in micro], packed=strategy == "bfd", pad_id=PAD,
                        max_length=max_length)
        if strategy == "bfd":
            assert batch.input_ids.shape[1] == max_length and batch.attention_lengths is None
        else:
            assert batch.document_ids is None and batch.input_ids.shape[1] == max(len(examples[r[0]]) for r in micro)
        seen += [(tuple(ids), tuple(labels)) for ids, labels, _ in documents(batch)]
    expected = Counter((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    assert Counter(seen) == expected
    trained = sum(e.num_trained for e in examples)
    assert sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in seen) == trained


def test_packed_and_unpacked_collate_give_the_same_pairs():
    examples = make_examples([5, 9, 3, 12, 7], seed=3)
    packed = collate([[examples[0], examples[1]], [examples[2], examples[3], examples[4]]], packed=True, pad_id=PAD,
                     max_length=32)
    unpacked = collate([[e] for e in examples], packed=False, pad_id=PAD, max_length=32)
    assert unpacked.attention_lengths.tolist() == [5, 9, 3, 12, 7] and unpacked.input_ids.shape == (5, 12)
    assert unpacked.position_ids[0].tolist() == list(range(12))
    assert packed.document_ids[0, :14].tolist() == [0] * 5 + [1] * 9 and packed.document_ids[0, 14:].eq(-1).all()
    assert packed.position_ids[1, :22].tolist() == list(range(3)) + list(range(12)) + list(range(7))

    def pairs(batch):
        keep = batch.labels != IGNORE_INDEX
        return Counter(zip(batch.input_ids[keep].tolist(), batch.labels[keep].tolist()))

    assert pairs(packed) == pairs(unpacked) and packed.num_tokens == unpacked.num_tokens
    assert unpacked.num_padding == 5 * 12 - 36 and packed.num_padding == 2 * 32 - 36


def collect(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("input_ids", "labels", "position_ids", "document_ids", "attention_lengths"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert (tx is None and ty is None) or torch.equal(tx, ty), name


@pytest.mark.parametrize("strategy", ["bfd", "none", "sorted"])
def test_loader_resume_mid_epoch_yields_the_uninterrupted_sequence(strategy):
    examples = make_examples(lognormal_lengths(60, median=10, sigma=0.6, max_length=32, seed=2))
    kw = dict(strategy=strategy, rows=3, max_length=32, pad_id=PAD, seed=5)
    straight = BatchLoader(examples, **kw)
    per_epoch = straight.batches_per_epoch
    expected = collect(straight, 2 * per_epoch + 3)  # crosses two epoch boundaries
    # epochs are reshuffled: the second epoch is not a copy of the first
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(expected, expected[per_epoch:]))

    for stop in (per_epoch // 2, per_epoch, per_epoch + 1):
        first = BatchLoader(examples, **kw)
        head = collect(first, stop)
        state = first.state_dict()
        assert (state["epoch"], state["batch_index"]) == ((stop - 1) // per_epoch, (stop - 1) % per_epoch + 1)
        resumed = BatchLoader(examples, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(head + collect(resumed, len(expected) - stop), expected)


def test_loader_refuses_a_state_from_other_data():
    examples = make_examples([4, 6, 8, 5, 7, 3])
    state = BatchLoader(examples, strategy="bfd", rows=2, max_length=16, pad_id=PAD, seed=0).state_dict()
    other = BatchLoader(examples[:-1], strategy="bfd", rows=2, max_length=16, pad_id=PAD, seed=0)
    with pytest.raises(ValueError, match="num_examples"):
        other.load_state_dict(state)


@pytest.mark.parametrize("strategy", ["bfd", "none", "sorted"])
def test_rank_shards_are_disjoint_and_complete(strategy):
    examples = make_examples(lognormal_lengths(101, median=9, sigma=0.6, max_length=24, seed=4))
    world = 3
    kw = dict(strategy=strategy, rows=2, max_length=24, pad_id=PAD, seed=1, world_size=world)
    loaders = [BatchLoader(examples, rank=r, **kw) for r in range(world)]
    assert len({loader.batches_per_epoch for loader in loaders}) == 1
    full = plan_batches([len(e) for e in examples], strategy=strategy, rows=2, max_length=24, order_seed=1)
    usable = len(full) - len(full) % world
    shards = [[i for micro in loader.plan for row in micro for i in row] for loader in loaders]
    assert sum(map(len, shards)) == len({i for shard in shards for i in shard}), "ranks overlap"
    assert sorted(i for shard in shards for i in shard) == sorted(i for m in full[:usable] for row in m for i in row)
    # what each rank yields is exactly its shard of the plan
    for rank, loader in enumerate(loaders):
        batch = next(loader)
        micro = full[rank]
        ref = collate([[examples[i] for i in row] for row in micro], packed=strategy == "bfd", pad_id=PAD,
                      max_length=24)
        assert_same_batches([batch], [ref])


@pytest.mark.parametrize("strategy", ["bfd", "sorted"])
def test_prefetching_loader_yields_the_same_stream_and_resumes_exactly(strategy):
    import gc

    examples = make_examples(lognormal_lengths(60, median=10, sigma=0.6, max_length=32, seed=2))
    kw = dict(strategy=strategy, rows=3, max_length=32, pad_id=PAD, seed=5)
    plain = BatchLoader(examples, **kw)
    expected = [next(plain) for _ in range(25)]  # crosses epochs
    ahead = BatchLoader(examples, **kw, prefetch=4)
    got = [next(ahead) for _ in range(9)]
    state = ahead.state_dict()
    assert state["epoch"] * ahead.batches_per_epoch + state["batch_index"] == 9  # taken, not prefetched
    got += [next(ahead) for _ in range(16)]
    assert_same_batches(got, expected)
    resumed = BatchLoader(examples, **kw, prefetch=2)
    resumed.load_state_dict(state)
    assert_same_batches([next(resumed) for _ in range(16)], expected[9:])
    thread = resumed._worker[0]
    del resumed
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()  # an abandoned loader stops its thread
    ahead.close()


# ------------------------------------------------------------------------------------- token-budget micro-batches

@pytest.mark.parametrize("strategy", ["none", "sorted", "bfd"])
def test_token_budget_plan_places_every_example_once_within_the_budget(strategy):
    max_length, budget = 256, 1024
    lengths = lognormal_lengths(2000, median=60, sigma=0.8, max_length=max_length, seed=3)
    plan = plan_batches(lengths, strategy=strategy, rows=1, max_length=max_length, order_seed=4, batch_tokens=budget)
    assert sorted(i for micro in plan for row in micro for i in row) == list(range(len(lengths)))
    if strategy == "bfd":  # fixed-width rows: the budget is a row count
        assert all(len(micro) == budget // max_length for micro in plan[:-1])
        assert all(sum(lengths[i] for i in row) <= max_length for micro in plan for row in micro)
    else:
        padded = [len(micro) * max(lengths[row[0]] for row in micro) for micro in plan]
        assert all(len(row) == 1 for micro in plan for row in micro) and max(padded) <= budget
        # greedy: each micro-batch was closed only because its next example would have overflowed the budget
        # (`sorted` shuffles its micro-batches afterwards: check the unshuffled plan)
        grouped = plan if strategy == "none" else plan_batches(lengths, strategy=strategy, rows=1,
                                                               max_length=max_length, order_seed=None,
                                                               batch_tokens=budget)
        following = [micro[0][0] for micro in grouped[1:]]
        assert all((len(micro) + 1) * max(max(lengths[r[0]] for r in micro), lengths[nxt]) > budget
                   for micro, nxt in zip(grouped, following))
        assert max(len(micro) for micro in plan) > budget // max_length  # short examples share a micro-batch
    assert plan == plan_batches(lengths, strategy=strategy, rows=1, max_length=max_length, order_seed=4,
                                batch_tokens=budget)
    assert plan != plan_batches(lengths, strategy=strategy, rows=1, max_length=max_length, order_seed=5,
                                batch_tokens=budget)


def test_token_budget_sorted_batches_pad_less_than_random_ones():
    max_length, budget = 512, 2048
    lengths = lognormal_lengths(3000, median=90, sigma=0.8, max_length=max_length, seed=6)

    def padding(strategy):
        plan = plan_batches(lengths, strategy=strategy, rows=1, max_length=max_length, order_seed=0,
                            batch_tokens=budget)
        return 1 - sum(lengths) / sum(len(micro) * max(lengths[row[0]] for row in micro) for micro in plan)

    assert padding("sorted") < 0.05 and padding("none") > 0.3


def test_token_budget_below_max_length_is_refused():
    with pytest.raises(ValueError, match=r"batch_tokens=100 is below max_length=128.*data.batch_tokens"):
        plan_batches([5, 6], strategy="sorted", rows=2, max_length=128, order_seed=0, batch_tokens=100)


@pytest.mark.parametrize("strategy", ["none", "bfd"])
def test_token_budget_loader_covers_each_epoch_and_resumes_exactly(strategy):
    max_length = 32
    examples = make_examples(lognormal_lengths(80, median=9, sigma=0.7, max_length=max_length, seed=7))
    kw = dict(strategy=strategy, rows=1, max_length=max_length, pad_id=PAD, seed=3, batch_tokens=96)
    straight = BatchLoader(examples, **kw)
    per_epoch = straight.batches_per_epoch
    expected = collect(straight, per_epoch + 4)
    seen = [doc for batch in expected[:per_epoch] for doc in documents(batch)]
    assert Counter((tuple(ids), tuple(labels)) for ids, labels, _ in seen) == Counter(
        (tuple(e.input_ids), tuple(e.labels)) for e in examples)
    assert all(batch.input_ids.numel() <= 96 for batch in expected)
    first = BatchLoader(examples, **kw)
    head = collect(first, 5)
    state = first.state_dict()
    assert state["batch_tokens"] == 96
    resumed = BatchLoader(examples, **kw)
    resumed.load_state_dict(state)
    assert_same_batches(head + collect(resumed, len(expected) - 5), expected)
    with pytest.raises(ValueError, match="data.batch_tokens differs from the checkpoint.s: it saved "
                                         "batch_tokens=96, this run has 0"):
        BatchLoader(examples, **{**kw, "batch_tokens": 0}).load_state_dict(state)
    legacy = {key: value for key, value in BatchLoader(examples, **{**kw, "batch_tokens": 0}).state_dict().items()
              if key != "batch_tokens"}  # saved before the setting existed: it was off
    BatchLoader(examples, **{**kw, "batch_tokens": 0}).load_state_dict(legacy)


def test_token_budget_epoch_loss_is_the_same_padded_or_packed():
    """One epoch of token-budget micro-batches: padded (random or sorted) and packed (bfd, document masks) give the
    same summed loss over the same trained tokens (fp32, the debug model)."""
    from optrush.models import build_model, get_preset
    from optrush.objectives import build_objective

    model = build_model(get_preset("debug"), dtype=torch.float32, device="cpu", seed=0).eval()
    objective = build_objective("causal_lm")
    examples = make_examples(lognormal_lengths(48, median=10, sigma=0.8, max_length=32, seed=8))
    totals = {}
    for strategy in ("none", "sorted", "bfd"):
        loader = BatchLoader(examples, strategy=strategy, rows=1, max_length=32, pad_id=PAD, seed=0,
                             batch_tokens=128)
        loss, units = 0.0, 0
        with torch.no_grad():
            for _ in range(loader.batches_per_epoch):
                batch = next(loader)
                loss += float(objective(model, batch)[0])
                units += objective.units(batch)
        totals[strategy] = (loss, units)
    assert totals["none"][1] == totals["sorted"][1] == totals["bfd"][1] == sum(e.num_trained for e in examples)
    assert totals["sorted"][0] == pytest.approx(totals["none"][0], rel=1e-5)
    assert totals["bfd"][0] == pytest.approx(totals["none"][0], rel=1e-5)


def test_data_parallel_loader_counts_what_each_epoch_leaves_out():
    """Ranks take whole micro-batches in turn; the plan's tail beyond a multiple of the ranks is left out and
    counted (the training loop reports it), and every other example is taken by exactly one rank."""
    lengths = lognormal_lengths(101, median=12, sigma=0.7, max_length=64, seed=3)
    examples = make_examples(lengths)
    kw = dict(strategy="none", rows=4, max_length=64, pad_id=PAD, seed=0)
    plan = plan_batches(lengths, strategy="none", rows=4, max_length=64, order_seed=0)
    assert len(plan) == 26  # 101 examples in rows of 4: 25 full micro-batches and one of 1
    ranks = [BatchLoader(examples, rank=r, world_size=3, **kw) for r in range(3)]
    assert all(loader.left_out == (2, 5) for loader in ranks)  # micro-batches 24 and 25: 4 + 1 examples
    taken = sorted(i for loader in ranks for micro in loader.plan for row in micro for i in row)
    assert taken == sorted(i for micro in plan[:24] for row in micro for i in row)
    assert BatchLoader(examples, **kw).left_out == (0, 0)
