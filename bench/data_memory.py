"""Peak memory and speed of the data stage at 52k and 520k Alpaca rows: does memory stay flat?

    .venv/bin/python bench/data_memory.py              # 52k and 520k rows (~8 min on 2 cores)
    .venv/bin/python bench/data_memory.py --sizes 1 3  # 52k and 156k

The corpus is Stanford Alpaca (../shared/realdata) written as JSON lines, once as is and then as
perturbed copies: in each copy a third of the words are replaced by other Alpaca words, so copies
are neither exact nor near duplicates of the originals and survive dedup like real new rows.
Each size runs the data stage (the alpaca-hh config's settings: dedup on the response, word
5-shingle near-dup at 0.8, contracts and Data Docs) in a fresh process, so `ru_maxrss` is that
run's own peak, once as configured and once with near-dup off (what the stage holds besides the
MinHash index, which may grow with the corpus). Reported per size: peak RSS, RSS before the stage started (interpreter, torch,
transformers, the tokenizer), the stage's own growth, the NearDupIndex's bytes, seconds and
rows/s, and the ratio of each to the 52k run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "realdata" / "alpaca" / "alpaca_data.json.gz"


def write_corpus(path: Path, copies: int, seed: int = 0) -> int:
    """Alpaca as JSON lines: the original rows, then `copies - 1` perturbed copies of them."""
    with gzip.open(ALPACA) as handle:
        rows = json.load(handle)
    vocabulary = sorted({word for row in rows[:5000] for word in row["output"].split()})
    rng = random.Random(seed)

    def perturb(text: str) -> str:
        return " ".join(rng.choice(vocabulary) if rng.random() < 0.33 else word for word in text.split())

    written = 0
    with path.open("w", encoding="utf-8") as handle:
        for copy in range(copies):
            for row in rows:
                if copy:
                    row = {key: perturb(value) if value else value for key, value in row.items()}
                handle.write(json.dumps(row) + "\n")
                written += 1
    return written


def child(corpus: Path, out_dir: Path, near_dup: bool) -> dict:
    """One stage run in this process; what the parent prints."""
    from posttrain.artifacts import Artifact
    from posttrain.config import TinyModelConfig, load_config
    from posttrain.models import build_tiny, load_tokenizer, save_pretrained
    from tasks import data

    base = out_dir / "base"
    model, tokenizer = build_tiny(TinyModelConfig(), seed=0)
    save_pretrained(model, tokenizer, base)
    load_tokenizer(base)
    import tasks.benchmarks
    from posttrain.config import BenchmarksConfig

    (out_dir / "benchmarks").mkdir(parents=True, exist_ok=True)
    tasks.benchmarks.run(BenchmarksConfig(), {}, out_dir / "benchmarks")
    import great_expectations  # noqa: F401  (imported by the stage anyway: count it in the baseline)

    config = load_config(REPO / "configs" / "alpaca-hh.yaml").data
    source = config.sources[0].model_copy(update={"path": str(corpus), "type": "jsonl"})
    near = config.near_dup.model_copy(update={"enabled": near_dup})
    config = config.model_copy(update={"sources": [source], "near_dup": near})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples, sampling = [], threading.Event()

    def sample() -> None:  # current RSS every 50 ms, to see which part of the stage sets the peak
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while not sampling.wait(0.05):
            resident = int(Path("/proc/self/statm").read_text().split()[1])
            samples.append((time.perf_counter(), resident * page_mb))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    artifact = data.run(config, {"base": Artifact(base, {}), "benchmarks": Artifact(out_dir / "benchmarks", {})}, out_dir / "data")
    finished = time.perf_counter()
    seconds = finished - started
    sampling.set()
    sampler.join()
    metrics = artifact.metrics
    # The stage streams (read -> clean -> dedup -> decontaminate), then writes the splits, then checks.
    contracts_from = finished - metrics["contracts_seconds"]
    split_from = contracts_from - metrics["split_seconds"]
    windows = {"streaming": (started, split_from), "split": (split_from, contracts_from), "contracts": (contracts_from, finished)}
    peaks = {name: max((rss for when, rss in samples if lo <= when <= hi), default=0.0) for name, (lo, hi) in windows.items()}
    return {
        "rows": metrics["rows_in"],
        "rows_out": metrics["rows_out"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": before,
        "near_dup_index_mb": metrics.get("near_dup_index_bytes", 0) / 2**20,
        "seconds": seconds,
        "peak_by_part_mb": peaks,
        "phases": {key: value for key, value in metrics.items() if key.endswith("_seconds") and not key.startswith("near_dup")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10], help="corpus sizes in copies of Alpaca (52,002 rows each)")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "OUT", "NEAR_DUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.child[2] == "on")))
        return
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA} not found: this bench needs the shared realdata folder")
    results = []
    with tempfile.TemporaryDirectory(prefix="posttrain-data-memory-") as scratch:
        for copies in args.sizes:
            corpus = Path(scratch) / f"alpaca-x{copies}.jsonl"
            write_corpus(corpus, copies)
            for near_dup in ("on", "off"):  # off: what the stage holds besides the MinHash index
                out_dir = Path(scratch) / f"run-x{copies}-{near_dup}"
                out_dir.mkdir()
                command = [sys.executable, __file__, "--child", str(corpus), str(out_dir), near_dup]
                done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
                results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "near_dup": near_dup})
            corpus.unlink()
    print("| rows | near-dup | rows out | seconds | rows/s | peak RSS MB | RSS before stage MB | stage growth MB | NearDupIndex MB (reported) | ratio rows | ratio seconds | ratio stage growth |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        first = next(r for r in results if r["near_dup"] == result["near_dup"])  # the smallest size, same setting
        growth = result["peak_rss_mb"] - result["baseline_rss_mb"]
        first_growth = first["peak_rss_mb"] - first["baseline_rss_mb"]
        print(
            f"| {result['rows']:,} | {result['near_dup']} | {result['rows_out']:,} | {result['seconds']:.1f} | {result['rows'] / result['seconds']:,.0f} "
            f"| {result['peak_rss_mb']:.0f} | {result['baseline_rss_mb']:.0f} | {growth:.0f} | {result['near_dup_index_mb']:.1f} "
            f"| {result['rows'] / first['rows']:.1f}x | {result['seconds'] / first['seconds']:.1f}x | {growth / first_growth:.2f}x |"
        )
    print()
    print("| rows | near-dup | peak RSS MB while streaming (read, clean, dedup) | while writing splits | during contracts |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for result in results:
        peaks = result["peak_by_part_mb"]
        print(f"| {result['rows']:,} | {result['near_dup']} | {peaks['streaming']:.0f} | {peaks['split']:.0f} | {peaks['contracts']:.0f} |")
    print()
    for result in results:
        phases = ", ".join(f"{key.removesuffix('_seconds')} {value:.1f}" for key, value in result["phases"].items())
        print(f"{result['rows']:,} rows, near-dup {result['near_dup']}, seconds per phase: {phases}")


if __name__ == "__main__":
    main()
