"""Near-duplicate detection: MinHash signatures of word n-grams, banded into LSH buckets (numpy, no extra deps).

    dup = NearDuplicates(threshold=0.8, ngram=3)     # a cleaning rule (see optrush.data.clean)
    kept, report = clean_records(records, rules=[dup])

MinHash (Broder 1997, https://doi.org/10.1109/SEQUEN.1997.666900): for a set S of shingle hashes and a random hash
function h, P[min h(S) = min h(T)] = Jaccard(S, T); `num_perm` such functions give a signature whose fraction of
equal entries estimates the Jaccard similarity. LSH banding (Leskovec et al., Mining of Massive Datasets, ch. 3)
cuts the signature into `bands` bands of `rows`: two records become candidates when any band is equal, which
happens with probability 1 - (1 - s^rows)^bands, steep around s = (1/bands)^(1/rows). Candidates are then kept
only when their estimated similarity reaches `threshold`, so the banding only decides what gets compared.

Everything is computed in bulk: words are hashed once through a cache (CRC32), n-gram hashes are combined in
numpy, and signatures are built for chunks of records with `np.minimum.reduceat`. Duplicates are found by sorting
each band's keys, and a record is dropped when it matches the *first* record of its bucket in some band (the
first is always kept), so the result does not depend on anything but the record order.

Memory: the fit pass streams records and keeps only their signatures (`num_perm` uint32: 256 bytes a record at
the default 64, 0.5 GB for 2M records) and a word-hash cache that is cleared past `WORD_CACHE` words.
"""
from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterable, Sequence
from itertools import islice

import numpy as np

CHUNK = 4096
WORD_CACHE = 1 << 20
MASK32 = np.uint64(0xFFFFFFFF)


class NearDuplicates:
    """Cleaning rule: drop a record whose word n-gram set is about as similar as `threshold` (estimated
    Jaccard) to an earlier record's."""
    name = "near_duplicate"
    needs_fit = True

    def __init__(self, *, threshold: float = 0.8, ngram: int = 3, num_perm: int = 64, seed: int = 0,
                 text=None):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold={threshold}: must be in (0, 1]")
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        # multiply-shift hashing (Dietzfelbinger et al. 1997): odd 64-bit multipliers, top 32 bits
        self.mult = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.add = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.text = text
        self.similar: dict[int, tuple[int, float]] = {}
        """Stream position of a near duplicate -> (position of the earlier record, estimated similarity)."""

    def fit(self, records: Iterable[tuple[int, dict]]) -> None:
        """One streamed pass: signatures of CHUNK records at a time (num_perm uint32 each), then the LSH search."""
        from optrush.data.clean import record_text

        records = iter(records)
        indices = array("q")
        parts: list[np.ndarray] = []
        cache: dict[str, int] = {}
        while chunk := list(islice(records, CHUNK)):
            indices.extend(index for index, _ in chunk)
            parts.append(self._chunk([(self.text or record_text)(record) for _, record in chunk], cache))
            if len(cache) > WORD_CACHE:
                cache.clear()
        signatures = np.concatenate(parts) if parts else np.zeros((0, self.num_perm), dtype=np.uint32)
        self.similar = {}
        for j, i in near_pairs(signatures, bands=self.bands, rows=self.rows, threshold=self.threshold).items():
            self.similar[indices[j]] = (indices[i], float(np.mean(signatures[i] == signatures[j])))

    def reject(self, index: int, record: dict) -> str | None:
        if index not in self.similar:
            return None
        earlier, similarity = self.similar[index]
        return f"~{similarity:.2f} similar to record {earlier + 1} of the input"

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        cache: dict[str, int] = {}
        for start in range(0, len(texts), CHUNK):
            out[start:start + CHUNK] = self._chunk(texts[start:start + CHUNK], cache)
        return out

    def _chunk(self, texts: Sequence[str], cache: dict[str, int]) -> np.ndarray:
        n = self.ngram
        flat: list[int] = []
        starts, counts = [], []
        for text in texts:
            words = text.split()
            starts.append(len(flat))
            counts.append(max(len(words), 1))
            for word in words:
                code = cache.get(word)
                if code is None:
                    code = cache[word] = zlib.crc32(word.encode()) + 1  # 0 is the end-of-record filler
                flat.append(code)
            flat.extend([0] * (n - 1 + (not words)))  # fillers: the last n-grams of a record stay inside it
        words = np.asarray(flat, dtype=np.uint64)
        # n-gram hash at every position: a polynomial over the next n word hashes (wrapping uint64)
        grams = words[: len(words) - n + 1].copy()
        for k in range(1, n):
            grams = grams * np.uint64(0x9E3779B97F4A7C15) + words[k: len(words) - n + 1 + k]
        starts = np.asarray(starts, dtype=np.int64)
        keep = np.concatenate([np.arange(s, s + c) for s, c in zip(starts.tolist(), counts)])
        shingles = grams[keep]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sig = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        with np.errstate(over="ignore"):
            for p in range(self.num_perm):
                hashed = ((shingles * self.mult[p] + self.add[p]) >> np.uint64(32)) & MASK32
                sig[:, p] = np.minimum.reduceat(hashed, offsets)
        return sig


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm whose S-curve midpoint (1/b)^(1/r) lies just below
    `threshold`, so pairs at the threshold become candidates with high probability."""
    options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    below = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold - 0.1] or options[-1:]
    return max(below, key=lambda br: (1 / br[0]) ** (1 / br[1]))


def near_pairs(signatures: np.ndarray, *, bands: int, rows: int, threshold: float) -> dict[int, int]:
    """{later record j: earlier record i} for records whose band equals the first record of its bucket and
    whose estimated similarity to it is >= threshold (the smallest such i)."""
    n = len(signatures)
    found: dict[int, int] = {}
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")  # stable: within a bucket, record order
        sorted_keys = keys[order]
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
        first = order[np.maximum.accumulate(np.where(new_group, np.arange(n), 0))]
        later = order[~new_group]
        firsts = first[~new_group]
        if not len(later):
            continue
        similar = (signatures[later] == signatures[firsts]).mean(axis=1) >= threshold
        for j, i in zip(later[similar].tolist(), firsts[similar].tolist()):
            if j not in found or i < found[j]:
                found[j] = i
    return found
