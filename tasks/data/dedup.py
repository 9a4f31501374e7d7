"""Steps 4-5 of the data stage: exact dedup on the normalised key, then streaming MinHash-LSH near-dedup.

    from tasks.data.dedup import ExactIndex, NearDupIndex
    from tasks.data.keytext import near_dup_keys
    index = NearDupIndex(config.near_dup)
    for records, row_ids in batches:                   # rows in reading order
        keys = near_dup_keys(records, fields, config.near_dup.strip_punctuation)
        kept_row = index.add_batch(keys, row_ids)      # None: keep; else the row it duplicates
    index.clusters(), index.stats()

Keep-the-first, decided once: a row is a near-duplicate when its shingle set has Jaccard >= threshold
with any earlier row (LSH finds the candidates, the exact Jaccard of the two shingle sets confirms
them). It joins the cluster of the earliest kept row among its matches. A kept row stays kept, so
streaming in batches gives the same answer as one batch. The union-find only ever hangs a new row
under an existing root, so every find is one step and time stays linear however big a cluster grows.

Backends (`NearDupConfig.backend`), both with the same semantics:
- "numpy" (default): shingling, hashing, MinHash and LSH as whole-batch numpy operations, straight
  from the code points that keytext.near_dup_keys makes (no per-row string). Words and shingles are
  hashed with a polynomial rolling hash over the code points (a cumulative sum), MinHash is the
  32-bit multiply `a*x` over each row's shingle hashes with `np.minimum.reduceat` (unbiased, see
  tests/tasks/test_dedup.py), and LSH band keys live in sorted runs (a log-structured merge) with a
  directory over their top bits for lookups. Per band, a row is checked against the first and the
  latest earlier row of its bucket only, which keeps candidates linear in rows; verification keeps
  every row's 32-bit shingle hashes (≈ 4 bytes per shingle) and computes exact Jaccard for all
  candidate pairs of a batch in one sort.
- "datasketch": the reference (Python shingle sets, `datasketch.MinHash`, `MinHashLSH`, every bucket
  member is a candidate). bench/dedup.py measures both, and rensa, on Alpaca.
Both use datasketch's (bands, rows) choice for the threshold. Deterministic across processes: no
Python `hash()` anywhere (it is salted per process); the constants come from a fixed numpy seed.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise

import numpy as np

from posttrain.config import NearDupConfig
from tasks.data.keytext import KeyCodes, collapse_spaces
from tasks.data.records import RESPONSE_ALIAS, ROLE_FIELDS

# ----------------------------------------------------------------------------- keys and exact dedup


def dedup_fields_for(role: str, dedup_key_fields: list[str]) -> list[str]:
    fields = [RESPONSE_ALIAS[role] if name == "response" else name for name in dedup_key_fields]
    unknown = [name for name in fields if name not in ROLE_FIELDS[role]]
    if unknown:
        raise ValueError(f"data.dedup_key: {unknown[0]!r} is not a field of {role} rows {ROLE_FIELDS[role]}")
    return fields


class ExactIndex:
    """Streaming exact dedup on the normalised key text.

    Holds one 16-byte blake2b digest per distinct key in a dict: ≈ 130 bytes per distinct row in
    CPython once the bytes object, the dict slot and the int are counted (measured with tracemalloc)."""

    def __init__(self) -> None:
        self._first: dict[bytes, int] = {}

    @staticmethod
    def digest(key_text: str) -> bytes:
        return hashlib.blake2b(key_text.encode(), digest_size=16).digest()

    def first_seen(self, key_text: str, row_id: int) -> int | None:
        """The row_id of the earlier row with this key, else None (and this row becomes the first)."""
        return self.first_seen_digest(self.digest(key_text), row_id)

    def first_seen_digest(self, digest: bytes, row_id: int) -> int | None:
        """first_seen for a key already digested (ExactIndex.digest), e.g. in a worker process."""
        first = self._first.setdefault(digest, row_id)
        return None if first == row_id else first

    def __len__(self) -> int:
        return len(self._first)


def shingles(text: str, size: int, unit: str) -> set[str]:
    """Character or word n-grams; a text shorter than one n-gram is its own single shingle."""
    if unit == "word":
        words = text.split()
        if len(words) <= size:
            return {" ".join(words)}
        return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
    if len(text) <= size:
        return {text}
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def has_shingles(text: str, unit: str) -> bool:
    """A row with nothing to shingle (empty, or no word) is never a near-duplicate; exact dedup covers it."""
    return bool(text.split()) if unit == "word" else bool(text)


# ----------------------------------------------------------------------------- LSH parameters


@cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives + false negatives, equally weighted.

    The same choice as `datasketch.MinHashLSH` (which integrates with scipy.quad; a fine trapezoid
    grid picks the same pair), so both backends see the same S-curve."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    bands, rows = pairs[:, :1], pairs[:, 1:]

    def integral(lo: float, hi: float, missed: bool) -> np.ndarray:
        s = np.linspace(lo, hi, 1001)[None, :]
        found = 1.0 - (1.0 - s**rows) ** bands
        return np.trapezoid(1.0 - found if missed else found, s, axis=1)

    error = integral(0.0, threshold, missed=False) + integral(threshold, 1.0, missed=True)
    b, r = pairs[int(np.argmin(error))]
    return int(b), int(r)


# ----------------------------------------------------------------------------- numpy hashing kernels

_U64 = np.uint64
_CHUNK_CHARS = 1 << 18  # texts are hashed in chunks of about this many characters: arrays stay in cache
_BAND_KEY_BITS = 40  # band keys are truncated so a sort can carry the entry position in the low 24 bits
_POSITION_BITS = 64 - _BAND_KEY_BITS
_rng = np.random.default_rng(0x5EED_D00D)  # fixed: the same hashes in every process and on every machine
_BASE = int(_rng.integers(1 << 62, 1 << 63)) | 1  # polynomial hash base; odd, so it has an inverse mod 2**64
_LENGTH_SALT = _U64(int(_rng.integers(1 << 62, 1 << 63)) | 1)  # "ab" + "" vs "a" + "b": spans differ in length
_WORD_WEIGHTS = _rng.integers(1 << 62, 1 << 63, size=64, dtype=np.int64).astype(_U64) | _U64(1)
_PERM_A = _rng.integers(0, 1 << 32, size=1024, dtype=np.int64).astype(np.uint32) | np.uint32(1)
_rng.integers(0, 1 << 32, size=1024, dtype=np.int64)  # was MinHash's "+ b"; still drawn, so the constants below stay the same
_BAND_WEIGHTS = _rng.integers(1 << 62, 1 << 63, size=1024, dtype=np.int64).astype(_U64) | _U64(1)
# Python's str.split() whitespace (all of it lies below U+3001), as a lookup table over code points.
_SPACE = np.array([chr(code).isspace() for code in range(0x3002)])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every output bit depends on every input bit (the rolling hash alone is linear)."""
    x = x ^ (x >> _U64(30))
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique without its hash-table path, which is ≈ 10x slower than a sort for 64-bit keys here."""
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)), without a Python loop."""
    total = int(counts.sum())
    steps = np.ones(total, dtype=np.int64)
    if total == 0:
        return steps
    ends = np.cumsum(counts)[:-1]
    nonempty = counts > 0
    first = np.concatenate(([0], ends))[nonempty]
    start_values = starts[nonempty]
    steps[first[0]] = start_values[0]
    steps[first[1:]] = start_values[1:] - (start_values[:-1] + counts[nonempty][:-1] - 1)
    return np.cumsum(steps)


class _Powers:
    """BASE**i and BASE**-i mod 2**64 for i < n, grown on demand (the rolling hash needs both)."""

    def __init__(self) -> None:
        self.tables = (np.ones(0, dtype=_U64), np.ones(0, dtype=_U64))

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        tables = self.tables  # one read: a thread growing them swaps both at once
        if len(tables[0]) < n:
            size, inverse_base = max(n, _CHUNK_CHARS + 1), pow(_BASE, -1, 1 << 64)
            forward = np.cumprod(np.full(size, _BASE, dtype=_U64)) * _U64(inverse_base)  # BASE**0 ...
            inverse = np.cumprod(np.full(size, inverse_base, dtype=_U64)) * _U64(_BASE)
            self.tables = tables = (forward, inverse)
        return tables


# The tables grow on demand and only ever hold BASE**±i, so every caller without its own can share
# them: built afresh per call they cost a 1M-entry cumprod each time (29 calls a run in decontamination).
_SHARED_POWERS = _Powers()


def _chunks(lengths: np.ndarray) -> Iterator[tuple[int, int]]:
    ends = np.cumsum(lengths + 1)
    lo = 0
    while lo < len(lengths):
        base = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, base + _CHUNK_CHARS, side="right")), lo + 1)
        yield lo, hi
        lo = hi


def _span_hash(prefix: np.ndarray, inverse: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Hash of codes[start:end] from the rolling-hash prefix sums: sum(c_j * BASE**(j - start))."""
    return _mix64((prefix[end] - prefix[start]) * inverse[start] + (end - start).astype(_U64) * _LENGTH_SALT)


def shingle_hashes(keys: KeyCodes | list[str], size: int, unit: str, powers: _Powers | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shingles as 32-bit hashes (flat, uint32, in row order, repeats kept) and the count per row.

    The same sets as `shingles()` of each text (words split like str.split, a text shorter than one
    shingle is one shingle), hashed instead of materialised: 32 bits are plenty to compare two rows'
    sets. Repeats are not removed here (MinHash ignores them); exact_jaccard removes them for the few
    rows it sees. Every hash is odd, so the multiply-only permutations of minhash_signatures never
    map one to 0."""
    keys = keys if isinstance(keys, KeyCodes) else KeyCodes.from_texts(keys)
    powers = powers or _SHARED_POWERS
    flat, counts = [], []
    key_starts = keys.starts
    for lo, hi in _chunks(keys.lengths):
        begin = int(key_starts[lo])
        lengths = keys.lengths[lo:hi]
        row_start = key_starts[lo:hi] - begin
        row_end = row_start + lengths  # each row is followed by one space, which ends its last word
        codes = keys.codes[begin : begin + int(row_end[-1]) + 1]
        forward, inverse = powers.upto(len(codes) + 1)
        prefix = np.zeros(len(codes) + 1, dtype=_U64)
        np.cumsum(codes * forward[: len(codes)], out=prefix[1:])  # wraps mod 2**64, as intended

        if unit == "word":
            edges = np.zeros(len(codes) + 2, dtype=bool)  # word chars, padded by a non-word at each end
            if keys.spaces_normalised:
                edges[1:-1] = codes != 0x20
            else:
                edges[1:-1] = ~(_SPACE[codes] if codes.dtype == np.uint8 else _SPACE[np.minimum(codes, len(_SPACE) - 1)])
            flips = np.flatnonzero(edges[1:] != edges[:-1])  # alternately a word's start and its end
            word_start, word_end = flips[0::2], flips[1::2]
            units = _span_hash(prefix, inverse, word_start, word_end)
            first_unit = np.searchsorted(word_start, row_start)
            per_row = np.searchsorted(word_start, row_end) - first_unit
        else:
            units, first_unit, per_row = None, row_start, lengths
        full = per_row >= size
        n_shingles = np.where(full, per_row - size + 1, (per_row > 0).astype(np.int64))
        starts = _ranges(first_unit, n_shingles)
        short = np.flatnonzero(~full & (per_row > 0))  # rows shorter than one shingle: one shingle, all of it
        short_at = (np.cumsum(n_shingles) - n_shingles)[short]
        if unit == "word":
            padded = np.concatenate([units, np.zeros(size, dtype=_U64)])
            weights = _WORD_WEIGHTS[:size]
            values = padded[starts] * weights[0]
            for t in range(1, size):
                values += padded[starts + t] * weights[t]
            short_values = np.zeros(len(short), dtype=_U64)
            for t in range(size - 1):
                inside = t < per_row[short]
                short_values[inside] += units[first_unit[short][inside] + t] * weights[t]
            values[short_at] = short_values
            values = _mix64(values)
        else:
            ends = starts + size
            ends[short_at] = row_end[short]
            values = _span_hash(prefix, inverse, starts, ends)
        flat.append((values >> _U64(32)).astype(np.uint32) | np.uint32(1))
        counts.append(n_shingles)
    if not flat:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return np.concatenate(flat), np.concatenate(counts)


def minhash_signatures(hashes: np.ndarray, counts: np.ndarray, num_perm: int) -> np.ndarray:
    """(num_perm, rows with a shingle) uint32 signatures: min over each row of a*x mod 2**32, a odd.

    Multiply-only: x -> a*x mod 2**32 is a bijection for odd a, and its high bits, which decide the
    minimum, are Dietzfelbinger's multiply-shift hash of x. The inputs are already mixed 64-bit hashes
    (odd, so never 0), and test_dedup checks that the estimate is unbiased with a binomial spread.
    Dropping the usual "+ b" saves a third of this step.

    Rows are taken in segments of about 64k hashes, all permutations per segment, so the working
    set stays in the CPU cache: twice as fast as one pass over all hashes per permutation."""
    nonempty = counts[counts > 0]
    starts = np.cumsum(nonempty) - nonempty
    signatures = np.empty((num_perm, len(starts)), dtype=np.uint32)
    scratch = np.empty(len(hashes), dtype=np.uint32)
    bounds = np.unique(np.append(np.searchsorted(starts, np.arange(0, len(hashes), 1 << 16)), len(starts)))
    for lo, hi in pairwise(bounds):
        begin, end = starts[lo], (starts[hi] if hi < len(starts) else len(hashes))
        segment, at, out = hashes[begin:end], starts[lo:hi] - begin, scratch[: end - begin]
        for k in range(num_perm):
            np.multiply(segment, _PERM_A[k], out=out)
            np.minimum.reduceat(out, at, out=signatures[k, lo:hi])
    return signatures


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, n) keys of _BAND_KEY_BITS bits; equal keys = equal band (up to a 2**-40 accident, which
    only adds a candidate that verification rejects). The band number is mixed in, so bands never meet."""
    keys = np.empty((bands, signatures.shape[1]), dtype=_U64)
    for band in range(bands):
        acc = np.full(signatures.shape[1], _U64(band), dtype=_U64)
        for t in range(band * rows, band * rows + rows):
            acc += signatures[t].astype(_U64) * _BAND_WEIGHTS[t]
        keys[band] = _mix64(acc) >> _U64(_POSITION_BITS)
    return keys


_DIRECTORY_FROM = 1 << 16  # keys; a smaller run is searched in the cache (bench: no gain from a directory below)


class _Run:
    """One sorted run of band keys with, per key, the first and the latest row (packed first << 32 | latest).

    A directory over the top bits of the key (≈ 2 keys per slot; the keys are hashes, so uniform)
    turns a lookup into two memory reads and a short scan, instead of a binary search whose ≈ 20
    dependent reads mostly miss the cache once the run outgrows it."""

    def __init__(self, keys: np.ndarray, rows: np.ndarray) -> None:
        self.keys, self.rows = keys, rows
        self.directory = None
        if len(keys) >= _DIRECTORY_FROM:  # a smaller run stays in the cache: binary search is cheaper than building one
            bits = int(len(keys)).bit_length()
            self.shift = _U64(_BAND_KEY_BITS - bits)
            self.directory = np.zeros((1 << bits) + 1, dtype=np.int32)
            np.cumsum(np.bincount((keys >> self.shift).astype(np.int64), minlength=1 << bits), out=self.directory[1:])

    def find(self, queries: np.ndarray) -> np.ndarray:
        """Index of each query key in this run, or -1."""
        if self.directory is None:
            at = np.minimum(np.searchsorted(self.keys, queries), len(self.keys) - 1)
            return np.where(self.keys[at] == queries, at, -1)
        slot = (queries >> self.shift).astype(np.int64)
        at, end = self.directory[slot], self.directory[slot + 1]
        last = len(self.keys) - 1
        scanning = np.flatnonzero(at < end)
        while len(scanning):  # within a slot the keys are sorted: step past the smaller ones
            step = self.keys[np.minimum(at[scanning], last)] < queries[scanning]
            scanning = scanning[step]
            at[scanning] += 1
            scanning = scanning[at[scanning] < end[scanning]]
        hit = (at < end) & (self.keys[np.minimum(at, last)] == queries)
        return np.where(hit, at, -1)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes + (0 if self.directory is None else self.directory.nbytes)


class _BucketRuns:
    """LSH buckets as sorted runs: per band key, the first and the latest row that had it.

    A batch becomes a new run; the newest two runs merge while the older is at most twice the newer
    (a log-structured merge: O(log n) runs, each entry merged O(log n) times; the merge itself is a
    stable sort of two concatenated sorted runs, which numpy's timsort does in one linear pass).
    Keeping only the first and latest row per key bounds a bucket's cost however many rows share it."""

    def __init__(self) -> None:
        self.runs: list[_Run] = []  # oldest first

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and latest earlier row for each (sorted, unique) key; -1 where none."""
        first = np.full(len(keys), -1, dtype=np.int64)
        latest = np.full(len(keys), -1, dtype=np.int64)
        for run in self.runs:
            at = run.find(keys)
            hit = at >= 0
            rows = run.rows[at[hit]]
            first[hit] = np.where(first[hit] < 0, rows >> 32, first[hit])
            latest[hit] = rows & 0xFFFFFFFF
        return first, latest

    def add(self, keys: np.ndarray, first: np.ndarray, latest: np.ndarray) -> None:
        if len(keys) == 0:
            return
        rows = first.astype(np.int64) << 32 | latest.astype(np.int64)
        while self.runs and len(self.runs[-1].keys) <= 2 * len(keys):
            older = self.runs.pop()
            merged_keys = np.concatenate([older.keys, keys])
            order = np.argsort(merged_keys, kind="stable")  # two sorted runs: timsort merges them linearly
            merged_keys, merged_rows = merged_keys[order], np.concatenate([older.rows, rows])[order]
            repeated = np.flatnonzero(merged_keys[1:] == merged_keys[:-1])  # a key in both: older entry first
            if len(repeated):  # keep the older first row and the newer latest row
                merged_rows[repeated] = (merged_rows[repeated] & ~0xFFFFFFFF) | (merged_rows[repeated + 1] & 0xFFFFFFFF)
                keep = np.ones(len(merged_keys), dtype=bool)
                keep[repeated + 1] = False
                merged_keys, merged_rows = merged_keys[keep], merged_rows[keep]
            keys, rows = merged_keys, merged_rows
        self.runs.append(_Run(keys, rows))

    def nbytes(self) -> int:
        return sum(run.nbytes() for run in self.runs)


class _Growable:
    """A 1-d numpy array with amortised O(1) append (capacity doubles)."""

    def __init__(self, dtype) -> None:
        self._data = np.zeros(1024, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        if self.size + len(values) > len(self._data):
            grown = np.zeros(max(2 * len(self._data), self.size + len(values)), dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : self.size + len(values)] = values
        self.size += len(values)

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]

    def nbytes(self) -> int:
        return self.size * self._data.itemsize  # pages past `size` are never touched, so not resident


def exact_jaccard(hashes: np.ndarray, offsets: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Jaccard of the shingle sets of rows left[i] and right[i], all pairs in one sort.

    Sort key: pair, hash, side (left 0 / right 1). Unique keys are the two sets; a hash that follows
    itself with the other side is in both."""
    left_counts, right_counts = offsets[left + 1] - offsets[left], offsets[right + 1] - offsets[right]
    pair = np.arange(len(left), dtype=_U64) << _U64(33)
    tagged = _sorted_unique(
        np.concatenate(
            [
                np.repeat(pair, left_counts) | hashes[_ranges(offsets[left], left_counts)].astype(_U64) << _U64(1),
                np.repeat(pair | _U64(1), right_counts) | hashes[_ranges(offsets[right], right_counts)].astype(_U64) << _U64(1),
            ]
        )
    )
    sizes = np.bincount((tagged >> _U64(33)).astype(np.int64), minlength=len(left))  # |A| + |B|
    shared = tagged[1:][(tagged[1:] >> _U64(1)) == (tagged[:-1] >> _U64(1))] >> _U64(33)
    inter = np.bincount(shared.astype(np.int64), minlength=len(left))
    return inter / np.maximum(sizes - inter, 1)


# ----------------------------------------------------------------------------- the streaming index


@dataclass
class Sketches:
    """What the numpy backend computes for a batch of rows before it looks at the index: each row's
    32-bit shingle hashes (flat, `counts` per row) and its LSH band keys (one column per row with a
    shingle). A pure function of the key texts and the config, so a worker process can make it."""

    hashes: np.ndarray
    counts: np.ndarray
    band_keys: np.ndarray
    seconds: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.counts)

    def select(self, keep: np.ndarray) -> Sketches:
        """The rows where `keep` (a bool per row) is true, in order."""
        keep = np.asarray(keep, dtype=bool)
        return Sketches(self.hashes[np.repeat(keep, self.counts)], self.counts[keep], self.band_keys[:, keep[self.counts > 0]], self.seconds)

    def slice(self, lo: int, hi: int) -> Sketches:
        keep = np.zeros(self.rows, dtype=bool)
        keep[lo:hi] = True
        return Sketches(**{**self.select(keep).__dict__, "seconds": {}})


def sketch(keys: KeyCodes | list[str], config: NearDupConfig, powers: _Powers | None = None) -> Sketches:
    """Shingle, MinHash and band the rows' near-dup keys (keytext.near_dup_keys, or plain strings)."""
    if not isinstance(keys, KeyCodes):
        keys = KeyCodes.from_texts(keys)
    elif config.shingle_unit == "char" and not keys.collapsed:
        keys = collapse_spaces(keys)  # runs of spaces would change char shingles
    started = time.perf_counter()
    hashes, counts = shingle_hashes(keys, config.shingle_size, config.shingle_unit, powers)
    hashed = time.perf_counter()
    bands, band_rows = lsh_bands(config.threshold, config.num_perm)
    signatures = minhash_signatures(hashes, counts, bands * band_rows)
    band = band_keys(signatures, bands, band_rows)
    return Sketches(hashes, counts, band, {"shingle_seconds": hashed - started, "hash_seconds": time.perf_counter() - hashed})


class NearDupIndex:
    """Streaming MinHash-LSH near-duplicate finder. Rows arrive in order in batches; each row is compared
    with every earlier row (of this index). Keep-the-first: a row that matches an earlier row is a
    duplicate and its cluster's first row is the one kept. Union-find keeps clusters; linear in rows."""

    def __init__(self, config: NearDupConfig):
        self.config = config
        self.bands, self.band_rows = lsh_bands(config.threshold, config.num_perm)
        self._row_ids = array("q")  # the caller's row ids, by arrival
        self._parent: dict[int, int] = {}  # union-find over internal ids (arrival order); absent = a root
        self._seconds = {"shingle_seconds": 0.0, "hash_seconds": 0.0, "lsh_seconds": 0.0}
        self._counts = {"candidate_pairs": 0, "verified_pairs": 0}
        if config.backend == "numpy":
            self._powers = _Powers()
            self._buckets = _BucketRuns()
            self._hashes = _Growable(np.uint32)  # every row's 32-bit shingle hashes, for exact verification
            self._offsets = _Growable(np.int64)
            self._offsets.extend(np.zeros(1, dtype=np.int64))
        else:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(num_perm=config.num_perm, params=(self.bands, self.band_rows))
            self._sets: list[set[str]] = []

    def add_batch(self, keys: KeyCodes | list[str], row_ids: list[int]) -> list[int | None]:
        """Per row: the row_id of the kept first row of the cluster it joins, or None (kept).

        `keys`: the rows' key texts (keytext.near_dup_keys, or plain strings taken as they are)."""
        if len(keys) != len(row_ids):
            raise ValueError(f"NearDupIndex.add_batch: {len(keys)} texts but {len(row_ids)} row ids")
        if self.config.backend == "numpy":
            return self.add_sketches(sketch(keys, self.config, self._powers), row_ids)
        keys = keys.texts() if isinstance(keys, KeyCodes) else keys
        first_id = len(self._row_ids)
        self._row_ids.extend(row_ids)
        return self._join(*self._pairs_datasketch(keys, first_id), first_id, len(keys))

    def add_sketches(self, sketches: Sketches, row_ids: list[int]) -> list[int | None]:
        """add_batch for rows already sketched (numpy backend), e.g. in a worker process."""
        if sketches.rows != len(row_ids):
            raise ValueError(f"NearDupIndex.add_sketches: {sketches.rows} rows sketched but {len(row_ids)} row ids")
        for name in ("shingle_seconds", "hash_seconds"):
            self._seconds[name] += sketches.seconds.get(name, 0.0)
        most = (1 << _POSITION_BITS) // self.bands  # entry positions must fit the low bits of a sort key
        if sketches.rows > most:
            return [kept for lo in range(0, sketches.rows, most) for kept in self.add_sketches(sketches.slice(lo, lo + most), row_ids[lo : lo + most])]
        first_id = len(self._row_ids)
        self._row_ids.extend(row_ids)
        return self._join(*self._pairs_numpy(sketches, first_id), first_id, sketches.rows)

    def _join(self, new: np.ndarray, old: np.ndarray, first_id: int, rows: int) -> list[int | None]:
        started = time.perf_counter()
        parent = self._parent
        for row, earlier in zip(new.tolist(), old.tolist()):  # sorted by row, so `earlier` is final
            root = parent.get(earlier, earlier)
            if root < parent.get(row, row):
                parent[row] = root  # the earliest kept row among its matches
        self._counts["verified_pairs"] += len(new)
        self._seconds["lsh_seconds"] += time.perf_counter() - started
        ids = self._row_ids
        return [None if (root := parent.get(i)) is None else ids[root] for i in range(first_id, first_id + rows)]

    def _pairs_numpy(self, sketches: Sketches, first_id: int) -> tuple[np.ndarray, np.ndarray]:
        config, started = self.config, time.perf_counter()
        hashes, counts, keys = sketches.hashes, sketches.counts, sketches.band_keys
        self._hashes.extend(hashes)
        self._offsets.extend(self._offsets.values[-1] + np.cumsum(counts))
        ids = first_id + np.flatnonzero(counts > 0)
        n = len(ids)
        # One sort groups equal band keys; within a key, entries come in arrival order (position bits).
        packed = np.sort(keys.reshape(-1) << _U64(_POSITION_BITS) | np.arange(keys.size, dtype=_U64))
        key = packed >> _U64(_POSITION_BITS)
        row = ids[(packed & _U64((1 << _POSITION_BITS) - 1)).astype(np.int64) % max(n, 1)]
        new_key = np.ones(len(key), dtype=bool)
        new_key[1:] = key[1:] != key[:-1]
        group = np.cumsum(new_key) - 1
        group_rows = row[new_key]
        last_in_group = np.ones(len(key), dtype=bool)
        last_in_group[:-1] = new_key[1:]
        earlier_first, earlier_latest = self._buckets.lookup(key[new_key])
        # Candidates per (row, band): the bucket's first row ever, and the row just before it in the bucket.
        head = np.where(earlier_first[group] >= 0, earlier_first[group], group_rows[group])
        previous = np.empty(len(key), dtype=np.int64)
        previous[new_key] = earlier_latest
        previous[~new_key] = row[:-1][~new_key[1:]]
        self._buckets.add(key[new_key], group_rows, row[last_in_group])
        rows = np.concatenate([row, row])
        others = np.concatenate([head, previous])
        keep = (others >= 0) & (others != rows)
        pairs = _sorted_unique(rows[keep].astype(_U64) << _U64(32) | others[keep].astype(_U64))
        new, old = (pairs >> _U64(32)).astype(np.int64), (pairs & _U64(0xFFFFFFFF)).astype(np.int64)
        self._counts["candidate_pairs"] += len(pairs)
        match = exact_jaccard(self._hashes.values, self._offsets.values, new, old) >= config.threshold
        self._seconds["lsh_seconds"] += time.perf_counter() - started
        return new[match], old[match]

    def _pairs_datasketch(self, texts: list[str], first_id: int) -> tuple[np.ndarray, np.ndarray]:
        from datasketch import MinHash

        config, started = self.config, time.perf_counter()
        unit, size = config.shingle_unit, config.shingle_size
        sets = [shingles(text, size, unit) if has_shingles(text, unit) else set() for text in texts]
        hashed = time.perf_counter()
        sketches = list(MinHash.generator(([s.encode() for s in shingle_set] for shingle_set in sets), num_perm=config.num_perm))
        sketched = time.perf_counter()
        self._sets += sets
        new, old = [], []
        for offset, (shingle_set, sketch) in enumerate(zip(sets, sketches)):
            if not shingle_set:
                continue
            row = first_id + offset
            for earlier in self._lsh.query(sketch):
                self._counts["candidate_pairs"] += 1
                other = self._sets[earlier]
                if len(shingle_set & other) / len(shingle_set | other) >= config.threshold:
                    new.append(row)
                    old.append(earlier)
            self._lsh.insert(row, sketch)
        order = np.lexsort((old, new))
        self._seconds["shingle_seconds"] += hashed - started
        self._seconds["hash_seconds"] += sketched - hashed
        self._seconds["lsh_seconds"] += time.perf_counter() - sketched
        return np.array(new, dtype=np.int64)[order], np.array(old, dtype=np.int64)[order]

    def clusters(self) -> list[list[int]]:
        """Clusters of size >= 2 as row_ids, kept row first, then members in arrival order; by kept row."""
        members: dict[int, list[int]] = {}
        for row in sorted(self._parent):
            members.setdefault(self._parent[row], []).append(row)
        ids = self._row_ids
        return [[ids[root]] + [ids[row] for row in rows] for root, rows in sorted(members.items())]

    def stats(self) -> dict[str, float]:
        """candidate_pairs, verified_pairs, index_bytes (signatures, buckets, stored shingle sets), timings."""
        if self.config.backend == "numpy":
            index_bytes = self._buckets.nbytes() + self._hashes.nbytes() + self._offsets.nbytes()
        else:  # an estimate: the stored sets and their strings; per band and row a bytes key and a bucket set
            index_bytes = sum(s.__sizeof__() + sum(map(len, s)) + 49 * len(s) for s in self._sets)
            index_bytes += len(self._sets) * self.bands * (33 + 8 * self.band_rows + 216 + 60)
        index_bytes += 8 * len(self._row_ids) + 100 * len(self._parent)  # ids; dict entries + ints
        return {**{k: float(v) for k, v in self._counts.items()}, "index_bytes": float(index_bytes), **self._seconds}
