"""Near-duplicate index (tasks/data/dedup.py): same sets as the Python reference, unbiased MinHash,
recall on planted near-duplicates, keep-first, streaming = one batch, linear big clusters, agreement
with datasketch. Speed is measured by bench/dedup.py, not here.

    .venv/bin/python -m pytest -q tests/tasks/test_dedup.py
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posttrain.config import NearDupConfig
from tasks.data.dedup import (
    ExactIndex,
    NearDupIndex,
    exact_jaccard,
    has_shingles,
    lsh_bands,
    minhash_signatures,
    shingle_hashes,
    shingles,
)
from tasks.data.keytext import near_dup_texts

REPO = Path(__file__).resolve().parents[2]
ALPACA = REPO.parent / "shared" / "realdata" / "alpaca" / "alpaca_data.json.gz"
WORDS = NearDupConfig(threshold=0.8, shingle_unit="word", shingle_size=5)


def vocabulary_text(rng: random.Random, words: int) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(words))


def edited(rng: random.Random, text: str, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = "edit"
    return " ".join(words)


def jaccard(a: str, b: str, size: int = 5, unit: str = "word") -> float:
    x, y = shingles(a, size, unit), shingles(b, size, unit)
    return len(x & y) / len(x | y)


def run(index: NearDupIndex, texts: list[str], batch: int | None = None) -> list[int | None]:
    batch = batch or len(texts)
    return [kept for lo in range(0, len(texts), batch) for kept in index.add_batch(texts[lo : lo + batch], list(range(lo, min(lo + batch, len(texts)))))]


@pytest.mark.parametrize("unit", ["word", "char"])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_shingle_hashes_are_the_python_shingle_sets(unit, size):
    rng = random.Random(size)
    alphabet = list("ab cD\t\né€x\x1c") + ["\u3000", "\U0001f600"]  # \x1c and U+3000 are whitespace to str.split
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(1500)]
    hashes, counts = shingle_hashes(texts, size, unit)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    distinct = [len(set(hashes[offsets[i] : offsets[i + 1]].tolist())) for i in range(len(texts))]
    assert distinct == [len(shingles(t, size, unit)) if has_shingles(t, unit) else 0 for t in texts]
    rows = np.flatnonzero(counts > 0)
    left, right = rng.choices(list(rows), k=800), rng.choices(list(rows), k=800)
    measured = exact_jaccard(hashes, offsets, np.array(left), np.array(right))
    assert measured == pytest.approx([jaccard(texts[a], texts[b], size, unit) for a, b in zip(left, right)], abs=1e-12)


def test_lsh_bands_are_datasketchs_choice():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
        for num_perm in (64, 128, 256):
            assert lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    assert lsh_bands(0.8, 128) == (9, 13)


def test_minhash_agreement_estimates_jaccard_without_bias():
    """The 32-bit multiply-only permutations: the fraction of equal signature entries averages the true
    Jaccard, with the spread of independent permutations (binomial)."""
    rng = random.Random(1)
    sources = [vocabulary_text(rng, 120) for _ in range(600)]
    copies = [edited(rng, text, rng.randint(1, 12)) for text in sources]
    hashes, counts = shingle_hashes(sources + copies, 5, "word")
    signatures = minhash_signatures(hashes, counts, 128)
    true = np.array([jaccard(a, b) for a, b in zip(sources, copies)])
    estimate = (signatures[:, : len(sources)] == signatures[:, len(sources) :]).mean(axis=0)
    assert 0.4 < true.mean() < 0.9
    assert abs((estimate - true).mean()) < 0.004  # 3 standard errors of the mean
    binomial = np.sqrt(true * (1 - true) / 128).mean()
    assert 0.85 * binomial < (estimate - true).std() < 1.15 * binomial


@pytest.mark.parametrize("backend", ["numpy", "datasketch"])
def test_recall_on_planted_near_duplicates_and_no_false_removals(backend):
    rng = random.Random(2)
    distinct = [vocabulary_text(rng, 200) for _ in range(2000)]
    sources = rng.sample(range(len(distinct)), 300)
    planted = [edited(rng, distinct[i], 1) for i in sources]  # J = 195/205 ≈ 0.95: the S-curve gives 99.8 %
    assert min(jaccard(distinct[i], p) for i, p in zip(sources, planted)) > 0.9
    kept = run(NearDupIndex(WORDS.model_copy(update={"backend": backend})), distinct + planted)
    assert kept[: len(distinct)] == [None] * len(distinct)  # no distinct row removed
    found = [kept[len(distinct) + k] for k in range(len(planted))]
    assert sum(k == i for k, i in zip(found, sources)) >= 0.98 * len(planted)  # and each points at its source


def test_char_shingles_catch_short_variants_after_punctuation_is_stripped():
    base = [f"reverse the word {w}" for w in ("apple", "banana", "cherry", "orange")] + [f"add {a} and {b}" for a, b in ((3, 4), (12, 5))]
    variants = ["REVERSE  the word apple.", "Reverse: the word banana?", "add 3 and 4 !"]
    texts = near_dup_texts([{"prompt": t} for t in base + variants], ["prompt"], True)
    kept = run(NearDupIndex(NearDupConfig()), texts)  # defaults: char 5-shingles, 0.85
    assert kept == [None] * 6 + [0, 1, 4]


def test_keep_first_clusters_and_the_same_answer_in_another_process():
    rng = random.Random(3)
    texts = [vocabulary_text(rng, 80) for _ in range(50)]
    texts = texts + [texts[7], edited(rng, texts[7], 1), texts[3], "", "   ", texts[7]]
    index = NearDupIndex(WORDS)
    kept = index.add_batch(texts, [100 + i for i in range(len(texts))])
    assert kept[:50] == [None] * 50
    assert kept[50:] == [107, 107, 103, None, None, 107]  # empty rows are exact dedup's business
    assert index.clusters() == [[103, 152], [107, 150, 151, 155]]
    stats = index.stats()
    assert stats["verified_pairs"] >= 4 and stats["candidate_pairs"] >= stats["verified_pairs"]
    assert all(isinstance(value, float) for value in stats.values()) and stats["index_bytes"] > 0
    # Salted str hashing differs per process; the index must not depend on it.
    script = (
        "import json, random, sys; sys.path.insert(0, '.');"
        "from tests.tasks.test_dedup import vocabulary_text, WORDS; from tasks.data.dedup import NearDupIndex;"
        "rng = random.Random(4); texts = [vocabulary_text(rng, 30) for _ in range(300)]; texts += texts[::7];"
        "index = NearDupIndex(WORDS); index.add_batch(texts, list(range(len(texts))));"
        "from tasks.data.dedup import shingle_hashes; h, c = shingle_hashes(texts[:5], 5, 'word');"
        "print(json.dumps([index.clusters(), h.tolist()]))"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    clusters, _ = json.loads(outputs.pop())
    assert len(clusters) == 43 and all(len(cluster) == 2 for cluster in clusters)


@pytest.mark.parametrize("backend", ["numpy", "datasketch"])
def test_streaming_batches_give_the_one_batch_answer(backend):
    rng = random.Random(5)
    texts = [vocabulary_text(rng, 60) for _ in range(1500)]
    texts += [edited(rng, rng.choice(texts), rng.randint(0, 2)) for _ in range(500)]
    rng.shuffle(texts)
    config = WORDS.model_copy(update={"backend": backend})
    whole = NearDupIndex(config)
    expected = run(whole, texts)
    assert 250 < sum(k is not None for k in expected) < 500
    for batch in (1, 37, 500):
        streamed = NearDupIndex(config)
        assert run(streamed, texts, batch) == expected
        assert streamed.clusters() == whole.clusters()
        assert streamed.stats()["verified_pairs"] == whole.stats()["verified_pairs"]


def test_a_big_cluster_stays_linear():
    """20k variants of one text: one cluster, its first row kept; candidates grow with rows, not pairs."""
    rng = random.Random(6)
    text = vocabulary_text(rng, 150)
    texts = [f"{text} tail{i}" for i in range(20_000)] + [vocabulary_text(rng, 150) for _ in range(200)]
    index = NearDupIndex(WORDS)
    kept = run(index, texts, batch=4096)
    clusters = index.clusters()
    assert len(clusters) == 1 and clusters[0][0] == 0 and len(clusters[0]) == 20_000
    assert kept[20_000:] == [None] * 200
    bands = lsh_bands(WORDS.threshold, WORDS.num_perm)[0]
    assert index.stats()["candidate_pairs"] <= 2 * bands * len(texts)  # all pairs would be 2e8


@pytest.mark.skipif(not ALPACA.exists(), reason="needs ../shared/realdata")
def test_agrees_with_datasketch_on_alpaca_outputs():
    with gzip.open(ALPACA, "rt", encoding="utf-8") as handle:
        records = json.load(handle)[:8000]
    texts = near_dup_texts(records, ["output"], True)
    found = {}
    for backend in ("numpy", "datasketch"):
        kept = run(NearDupIndex(WORDS.model_copy(update={"backend": backend})), texts)
        found[backend] = {i for i, k in enumerate(kept) if k is not None}
    common, either = found["numpy"] & found["datasketch"], found["numpy"] | found["datasketch"]
    assert len(found["datasketch"]) > 150
    assert len(common) / len(either) >= 0.99


def test_whole_row_and_single_field_keys():
    rng = random.Random(7)
    answer = vocabulary_text(rng, 200)  # prompts of 60 words: whole rows with different prompts have J ≈ 0.62
    records = [{"prompt": vocabulary_text(rng, 60), "response": answer} for _ in range(3)]
    records.append({"prompt": records[0]["prompt"], "response": edited(rng, answer, 1)})
    single = run(NearDupIndex(WORDS), near_dup_texts(records, ["response"], True))
    whole = run(NearDupIndex(WORDS), near_dup_texts(records, ["prompt", "response"], True))
    assert single == [None, 0, 0, 0]  # the same answer to different prompts
    assert whole == [None, None, None, 0]  # only the row repeating prompt and (nearly) the answer


def test_exact_index_and_bad_input():
    index = ExactIndex()
    assert [index.first_seen(key, i) for i, key in enumerate(["a b", "c", "a b", "a b", "c "])] == [None, None, 0, 0, None]
    assert len(index) == 3
    with pytest.raises(ValueError, match="2 texts but 1 row ids"):
        NearDupIndex(WORDS).add_batch(["a", "b"], [0])
