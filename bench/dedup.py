"""Near-duplicate detection on real Alpaca rows: datasketch, rensa and our numpy backend in one process.

    .venv/bin/python bench/dedup.py                  # 52k rows, 3 repeats, scaling 52k -> 520k (≈ 3 min)
    .venv/bin/python bench/dedup.py --quick          # 20k rows, 1 repeat, scaling 20k -> 200k (≈ 1 min)
    .venv/bin/python bench/dedup.py --realdata DIR   # default: ../shared/realdata from the repository root

Setting (the issue's): the Alpaca `output` field, lower-cased and punctuation stripped, word
5-shingles, 128 permutations, threshold 0.8. Every method is timed end to end, from the raw rows to
the keep/drop answer: key text, shingling, hashing, LSH and verification. Every method gives the same
thing: streaming keep-the-first, a row is a duplicate when the exact Jaccard of its shingle set with
an earlier row's reaches the threshold, among that method's LSH candidates. The methods:
  datasketch per-row  near_dup_texts, Python shingle sets, `MinHash()` + `update_batch` per row (datasketch's README)
  datasketch bulk     near_dup_texts, `MinHash.generator` (tasks/data's reference backend, NearDupConfig.backend)
  rensa               near_dup_texts, Python shingles, `RMinHash.from_token_sets`, `RMinHashLSH` (8 bands: it needs a divisor of 128)
  numpy               near_dup_keys + NearDupIndex's default backend (tasks/data), all rows in one add_batch
  numpy, 4k batches   the same, 4,096 rows at a time as the data stage streams them (same answer)
The Python methods get the fastest key text there is (the batch near_dup_texts, built on the same
vectorised normalisation); the per-row regex version is timed once for reference.
Agreement is measured against datasketch bulk: duplicate rows in common / in either, and pairs of
rows put in the same cluster in common / in either. Then: index memory (fresh processes), recall
on injected near-duplicates, the issue's reference figures, and the numpy backend from 52k to 520k
rows (10 perturbed copies of each real row; each size in a fresh process, so its peak RSS is its own).
Timings are wall clock on whatever else the machine is doing: the load average is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from posttrain.config import NearDupConfig
from tasks.data.dedup import (
    NearDupIndex,
    has_shingles,
    lsh_bands,
    shingles,
)
from tasks.data.keytext import near_dup_keys, near_dup_text, near_dup_texts

REPO = Path(__file__).resolve().parents[1]
CONFIG = NearDupConfig(threshold=0.8, num_perm=128, shingle_size=5, shingle_unit="word", strip_punctuation=True)


def load_alpaca(realdata: Path) -> list[dict]:
    with gzip.open(realdata / "alpaca" / "alpaca_data.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def decide(n: int, new: list[int], old: list[int]) -> list[int | None]:
    """Keep-the-first from verified (row, earlier row) pairs, as NearDupIndex does."""
    parent: dict[int, int] = {}
    for row, earlier in sorted(zip(new, old)):
        root = parent.get(earlier, earlier)
        if root < parent.get(row, row):
            parent[row] = root
    return [parent.get(i) for i in range(n)]


def streaming_lsh(sets: list[set], sketches: list, lsh) -> tuple[list[int | None], int, int]:
    """Query each row against the earlier rows, confirm by exact Jaccard, insert it."""
    new, old, candidates = [], [], 0
    for row, (shingle_set, sketch) in enumerate(zip(sets, sketches)):
        if not shingle_set:
            continue
        for earlier in lsh.query(sketch):
            candidates += 1
            other = sets[earlier]
            if len(shingle_set & other) / len(shingle_set | other) >= CONFIG.threshold:
                new.append(row)
                old.append(earlier)
        lsh.insert(row, sketch)
    return decide(len(sets), new, old), candidates, len(new)


def python_sets(texts: list[str]) -> list[set]:
    unit, size = CONFIG.shingle_unit, CONFIG.shingle_size
    return [shingles(text, size, unit) if has_shingles(text, unit) else set() for text in texts]


def run_datasketch_per_row(records: list[dict], field: str = "output") -> dict:
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    texts = near_dup_texts(records, [field], True)
    keyed = time.perf_counter()
    sets = python_sets(texts)
    shingled = time.perf_counter()
    sketches = []
    for shingle_set in sets:
        sketch = MinHash(num_perm=CONFIG.num_perm)
        sketch.update_batch([s.encode() for s in shingle_set])
        sketches.append(sketch)
    hashed = time.perf_counter()
    kept, candidates, verified = streaming_lsh(sets, sketches, MinHashLSH(threshold=CONFIG.threshold, num_perm=CONFIG.num_perm))
    done = time.perf_counter()
    return {"kept": kept, "candidates": candidates, "verified": verified, "key": keyed - started, "shingle": shingled - keyed, "hash": hashed - shingled, "lsh": done - hashed}


def run_rensa(records: list[dict], field: str = "output") -> dict:
    from rensa import RMinHash, RMinHashLSH

    started = time.perf_counter()
    texts = near_dup_texts(records, [field], True)
    keyed = time.perf_counter()
    sets = python_sets(texts)
    shingled = time.perf_counter()
    sketches = RMinHash.from_token_sets([list(s) for s in sets], num_perm=CONFIG.num_perm, seed=42)
    hashed = time.perf_counter()
    lsh = RMinHashLSH(threshold=CONFIG.threshold, num_perm=CONFIG.num_perm, num_bands=8)
    kept, candidates, verified = streaming_lsh(sets, sketches, lsh)
    done = time.perf_counter()
    return {"kept": kept, "candidates": candidates, "verified": verified, "key": keyed - started, "shingle": shingled - keyed, "hash": hashed - shingled, "lsh": done - hashed}


def run_index(records: list[dict], backend: str, batch: int | None = None, field: str = "output") -> dict:
    """NearDupIndex fed as the data stage feeds it: per batch, the rows' keys, then add_batch."""
    index = NearDupIndex(CONFIG.model_copy(update={"backend": backend}))
    batch = batch or len(records)
    kept, key_seconds = [], 0.0
    for lo in range(0, len(records), batch):
        started = time.perf_counter()
        if backend == "numpy":
            keys = near_dup_keys(records[lo : lo + batch], [field], True, collapse=CONFIG.shingle_unit == "char")
        else:
            keys = near_dup_texts(records[lo : lo + batch], [field], True)
        key_seconds += time.perf_counter() - started
        kept += index.add_batch(keys, list(range(lo, min(lo + batch, len(records)))))
    stats = index.stats()
    return {
        "kept": kept,
        "key": key_seconds,
        "candidates": int(stats["candidate_pairs"]),
        "verified": int(stats["verified_pairs"]),
        "shingle": stats["shingle_seconds"],
        "hash": stats["hash_seconds"],
        "lsh": stats["lsh_seconds"],
        "index_bytes": stats["index_bytes"],
    }


METHODS = {
    "datasketch per-row": run_datasketch_per_row,
    "datasketch bulk": lambda records, field="output": run_index(records, "datasketch", field=field),
    "rensa": run_rensa,
    "numpy": lambda records, field="output": run_index(records, "numpy", field=field),
    "numpy, 4k batches": lambda records, field="output": run_index(records, "numpy", batch=4096, field=field),  # as the data stage streams
}


def cluster_pairs(kept: list[int | None]) -> int:
    sizes = Counter(root for root in kept if root is not None)
    return sum((size + 1) * size // 2 for size in sizes.values())


def common_cluster_pairs(a: list[int | None], b: list[int | None]) -> int:
    """Row pairs in the same cluster under both a and b (a row's cluster is its kept row, or itself)."""
    cells = Counter((i if x is None else x, i if y is None else y) for i, (x, y) in enumerate(zip(a, b)))
    return sum(size * (size - 1) // 2 for size in cells.values())


def timed(function, records, repeats: int) -> dict:
    results = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(records)
        result["seconds"] = time.perf_counter() - started
        results.append(result)
    best = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]  # the median run
    best["all_seconds"] = [r["seconds"] for r in results]
    return best


def plant(texts: list[str], count: int, seed: int = 7) -> tuple[list[str], list[int], list[float]]:
    """Append `count` edited copies of long distinct rows: one word dropped, swapped or replaced."""
    rng = random.Random(seed)
    seen = Counter(texts)
    sources = [i for i, text in enumerate(texts) if len(text.split()) >= 60 and seen[text] == 1]
    planted, jaccards = [], []
    for source in rng.sample(sources, count):
        words = texts[source].split()
        at = rng.randrange(len(words) - 1)
        edit = rng.choice(["drop", "swap", "replace"])
        if edit == "drop":
            del words[at]
        elif edit == "swap":
            words[at], words[at + 1] = words[at + 1], words[at]
        else:
            words[at] = rng.choice(["quite", "very", "really", "indeed"])
        planted.append(" ".join(words))
        a, b = shingles(texts[source], 5, "word"), shingles(planted[-1], 5, "word")
        jaccards.append(len(a & b) / len(a | b))
    return texts + planted, list(range(len(texts), len(texts) + count)), jaccards


def perturbed_corpus(outputs: list[str], rows: int, seed: int = 11) -> list[str]:
    """`rows` raw texts: rows/10 real outputs, each followed later by 9 edited copies. One copy in ten
    is a light edit (a near-duplicate), the rest drop a third of the words, swap and re-case some."""
    rng = random.Random(seed)
    base = outputs[: rows // 10]
    corpus = list(base)
    for _ in range(9):
        for text in base:
            words = text.split()
            if rng.random() < 0.1 and len(words) > 30:
                del words[rng.randrange(len(words))]
            else:
                words = [w.upper() if rng.random() < 0.1 else w for w in words if rng.random() > 0.33]
                for _ in range(len(words) // 8):
                    i, j = rng.randrange(len(words)), rng.randrange(len(words))
                    words[i], words[j] = words[j], words[i]
            corpus.append(" ".join(words))
    return corpus


def status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def scale_child(rows: int, batch: int, realdata: Path, repeats: int) -> None:
    records = [{"output": text} for text in perturbed_corpus([row["output"] for row in load_alpaca(realdata)], rows)]
    near_dup_keys(records[:100], ["output"], True)  # builds the per-process normalisation tables (≈ 50 ms, once)
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the peak read
    # afterwards is this run's own (ru_maxrss would also count the parent's memory at fork).
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # start from what is really in use
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = status_bytes("VmRSS")
    runs = sorted((timed(lambda records: run_index(records, "numpy", batch=batch), records, 1) for _ in range(repeats)), key=lambda r: r["seconds"])
    result = runs[len(runs) // 2]  # the median run; a new index each time
    print(json.dumps({
        "rows": rows, "batch": batch, "seconds": result["seconds"], "key_seconds": result["key"],
        "duplicates": sum(k is not None for k in result["kept"]), "index_bytes": result["index_bytes"],
        "rss_before": rss_before, "peak_rss": status_bytes("VmHWM"), "split": [result["shingle"], result["hash"], result["lsh"]],
    }))


def memory_child(backend: str, realdata: Path) -> None:
    alpaca = load_alpaca(realdata)
    texts = near_dup_keys(alpaca, ["output"], True, collapse=False) if backend == "numpy" else near_dup_texts(alpaca, ["output"], True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    index = NearDupIndex(CONFIG.model_copy(update={"backend": backend}))
    index.add_batch(texts, list(range(len(texts))))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS counts what is still held
    print(json.dumps({"held": status_bytes("VmRSS") - before, "peak": status_bytes("VmHWM") - before, "index_bytes": index.stats()["index_bytes"]}))


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} vCPU, {psutil.virtual_memory().total / 2**30:.0f} GiB; load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--realdata", type=Path, default=REPO.parent / "shared" / "realdata")
    parser.add_argument("--quick", action="store_true", help="20k rows, 1 repeat, scaling to 200k")
    parser.add_argument("--repeats", type=int, default=None, help="runs per method, the median is shown (default 3, quick 1)")
    parser.add_argument("--plants", type=int, default=2000, help="injected near-duplicates for the recall table")
    parser.add_argument("--scale-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=52_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        return scale_child(args.scale_child, args.batch, args.realdata, args.repeats or 3)
    if args.memory_child:
        return memory_child(args.memory_child, args.realdata)
    rows_wanted = 20_000 if args.quick else 52_002
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"machine: {machine()}")

    alpaca = load_alpaca(args.realdata)[:rows_wanted]
    started = time.perf_counter()
    per_row_keys = [near_dup_text(row, ["output"], True) for row in alpaca]
    key_per_row = time.perf_counter() - started
    texts = near_dup_texts(alpaca, ["output"], True)
    assert texts == per_row_keys  # the batch normalisation is the per-row definition, row for row
    print(f"\nAlpaca `output`, {len(alpaca):,} rows; word 5-shingles, 128 perms, threshold 0.8; median of {repeats} run(s)")
    print(f"key text for reference: near_dup_text per row (two regexes a row) {key_per_row:.2f} s")

    results = {name: timed(function, alpaca, repeats) for name, function in METHODS.items()}
    reference, slowest = results["datasketch bulk"], results["datasketch per-row"]
    print("(end to end: rows/s from the raw rows to the answer, key text and shingling included)")
    print(f"\n{'method':<20} {'rows/s':>9} {'x bulk':>7} {'x per-row':>9} {'seconds':>8} {'key':>6} {'shingle':>8} {'hash':>7} {'lsh':>7} {'runs (s)':>18}")
    for name, r in results.items():
        runs = "/".join(f"{s:.2f}" for s in r["all_seconds"])
        print(
            f"{name:<20} {len(alpaca) / r['seconds']:>9,.0f} {reference['seconds'] / r['seconds']:>7.1f} {slowest['seconds'] / r['seconds']:>9.1f} "
            f"{r['seconds']:>8.2f} {r['key']:>6.2f} {r['shingle']:>8.2f} {r['hash']:>7.2f} {r['lsh']:>7.2f} {runs:>18}"
        )
    ref_dups = {i for i, k in enumerate(reference["kept"]) if k is not None}
    ref_pairs = cluster_pairs(reference["kept"])
    print(f"\n{'method':<20} {'candidates':>10} {'verified':>9} {'dup rows':>9} {'rows agree':>10} {'cluster pairs':>13} {'pairs agree':>11}")
    for name, r in results.items():
        dups = {i for i, k in enumerate(r["kept"]) if k is not None}
        pairs = cluster_pairs(r["kept"])
        common = common_cluster_pairs(r["kept"], reference["kept"])
        print(
            f"{name:<20} {r['candidates']:>10,} {r['verified']:>9,} {len(dups):>9,} {len(dups & ref_dups) / max(len(dups | ref_dups), 1):>10.2%} "
            f"{pairs:>13,} {common / max(pairs + ref_pairs - common, 1):>11.2%}"
        )
    print("\nindex memory, all 52k Alpaca rows in one add_batch, each in a fresh process (RSS growth while the index is held;")
    print("peak: the highest RSS while building, over the same start; stats: NearDupIndex.stats()['index_bytes'], an estimate for datasketch)")
    print(f"{'method':<20} {'held MiB':>9} {'peak MiB':>9} {'stats MiB':>10}")
    for name, backend in (("datasketch bulk", "datasketch"), ("numpy", "numpy")):
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", backend, "--realdata", str(args.realdata)], capture_output=True, text=True, check=True
        )
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:<20} {r['held'] / 2**20:>9.0f} {r['peak'] / 2**20:>9.0f} {r['index_bytes'] / 2**20:>10.0f}")

    planted_texts, planted, jaccards = plant(texts, args.plants)
    planted_records = [{"output": text} for text in planted_texts]  # key texts are their own key text
    print(f"\ninjected near-duplicates: {args.plants:,} edited copies of distinct rows with ≥ 60 words (one word dropped, swapped or")
    print(f"replaced), appended after the real rows; their true Jaccard with the source: min {min(jaccards):.3f}, median "
          f"{statistics.median(jaccards):.3f}, {sum(j >= 0.8 for j in jaccards):,} at ≥ 0.8. 'expected' is the mean LSH S-curve "
          "1-(1-J^r)^b over the plants: what any unbiased MinHash with that banding finds")
    print(f"{'method':<20} {'bands x rows':>12} {'recall':>7} {'expected':>8} {'other rows changed':>18}")
    for name, function in METHODS.items():
        kept = function(planted_records)["kept"]
        found = sum(kept[i] is not None for i in planted) / len(planted)
        bands, band_rows = (8, 16) if name == "rensa" else lsh_bands(CONFIG.threshold, CONFIG.num_perm)
        expected = statistics.fmean(1 - (1 - j**band_rows) ** bands for j in jaccards)
        changed = sum((a is None) != (b is None) for a, b in zip(kept[: len(texts)], results[name]["kept"]))
        print(f"{name:<20} {f'{bands} x {band_rows}':>12} {found:>7.1%} {expected:>8.1%} {changed:>18}")

    print("\nreference figures (issue: ≈ 1.5k near-duplicate outputs at 0.8, almost no near-duplicate instructions):")
    for field in ("output", "instruction"):
        for name in ("datasketch bulk", "numpy"):
            kept = results[name]["kept"] if field == "output" else METHODS[name](alpaca, field)["kept"]
            clusters = len({k for k in kept if k is not None})
            print(f"  {field:<12} {name:<16} {sum(k is not None for k in kept):>6,} removals in {clusters:,} clusters")

    sizes = (20_000, 200_000) if args.quick else (52_000, 520_000)
    print(f"\nscaling, numpy backend end to end, each size and batch size in a fresh process, median of {repeats} "
          f"({sizes[0] // 10:,} / {sizes[1] // 10:,} real rows × 10 perturbed copies):")
    print(f"{'rows':>9} {'batch':>7} {'rows/s':>9} {'seconds':>8} {'key/shingle/hash/lsh':>23} {'dup rows':>9} {'index MiB':>9} {'RSS before MiB':>14} {'peak growth MiB':>15} {'rows/s vs small':>15}")
    for batch in (4_096, 52_000):
        first = None
        for size in sizes:
            child = subprocess.run(
                [sys.executable, __file__, "--scale-child", str(size), "--batch", str(batch), "--realdata", str(args.realdata), "--repeats", str(repeats)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(child.stdout.strip().splitlines()[-1])
            rate = r["rows"] / r["seconds"]
            first = first or rate
            split = "/".join(f"{s:.2f}" for s in [r["key_seconds"], *r["split"]])
            print(
                f"{r['rows']:>9,} {batch:>7,} {rate:>9,.0f} {r['seconds']:>8.2f} {split:>23} {r['duplicates']:>9,} "
                f"{r['index_bytes'] / 2**20:>9.1f} {r['rss_before'] / 2**20:>14.0f} {(r['peak_rss'] - r['rss_before']) / 2**20:>15.0f} {rate / first:>15.2f}"
            )
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
