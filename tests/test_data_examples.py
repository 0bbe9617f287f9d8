"""Flat example storage: an `Examples` store gives back exactly the examples packed into it (views, slices,
selections, concatenation), costs about 8 bytes per token, and the loader yields the same batches over a store as
over a list; `bounded_map` never runs more than `ahead` calls ahead of its consumer."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from optrush.data.batch import IGNORE_INDEX
from optrush.data.dataset import bounded_map
from optrush.data.examples import Example, Examples, lengths_of
from optrush.data.loader import BatchLoader


def random_examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 40))
        ids = rng.integers(0, 50_000, size=length)
        labels = np.where(rng.random(length) < 0.3, IGNORE_INDEX, rng.integers(0, 50_000, size=length))
        out.append(Example(input_ids=ids.tolist(), labels=labels.tolist()))
    return out


def test_store_round_trips_examples(monkeypatch):
    monkeypatch.setattr("optrush.data.examples.PACK_CHUNK", 7)  # several chunks joined
    examples = random_examples(50)
    store = Examples.from_examples(iter(examples))
    assert len(store) == 50 and store == examples and list(store) == examples
    assert store[-1] == examples[-1] and store[3].input_ids == examples[3].input_ids
    assert store[3].labels == examples[3].labels and isinstance(store[3].input_ids, list)
    assert store.lengths.tolist() == [len(e) for e in examples] == lengths_of(examples).tolist()
    assert store.num_tokens == sum(len(e) for e in examples)
    assert store.num_trained == sum(e.num_trained for e in examples)
    assert store[10:20] == examples[10:20] and store[10:20][0] == examples[10]
    keep = np.arange(50) % 3 == 0
    assert store.select(keep) == [e for e, k in zip(examples, keep) if k]
    assert store[:20] + store[20:] == store and Examples.from_examples([]) == []
    with pytest.raises(IndexError):
        store[50]


def test_store_costs_eight_bytes_per_token():
    store = Examples.from_examples(random_examples(200))
    assert store.tokens.dtype == store.labels.dtype == np.int32
    assert 8 <= store.nbytes / store.num_tokens < 8 + 8 * len(store) / store.num_tokens + 0.01


def test_loader_over_store_equals_loader_over_list():
    examples = random_examples(120, seed=1)
    kw = dict(strategy="bfd", rows=3, max_length=64, pad_id=0, seed=5)
    a, b = BatchLoader(examples, **kw), BatchLoader(Examples.from_examples(examples), **kw)
    for _ in range(2 * a.batches_per_epoch):
        x, y = next(a), next(b)
        for name in ("input_ids", "labels", "position_ids", "document_ids"):
            assert getattr(x, name).dtype == getattr(y, name).dtype and getattr(x, name).equal(getattr(y, name))


def test_bounded_map_keeps_order_and_bounds_work_ahead():
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield i

    yielded = 0
    with ThreadPoolExecutor(2) as pool:
        for result in bounded_map(pool, lambda x: x * x, items(), ahead=3):
            assert result == yielded * yielded and pulled - yielded <= 3
            yielded += 1
    assert yielded == 40
