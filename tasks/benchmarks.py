"""Benchmarks stage: materialise every configured benchmark as `<name>.jsonl` held-out items.

    run({"skills": BenchmarkConfig(per_skill=100)}, {}, out_dir)   # -> out_dir/skills.jsonl

Making the benchmark an artifact gives it a digest: the data stage decontaminates against exactly
these items and the evaluate stage scores exactly these items, and changing a benchmark re-runs
both — nothing else.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from posttrain.artifacts import Artifact
from posttrain.benchmarks import load_items
from posttrain.config import BenchmarkConfig
from posttrain.jsonl import write_jsonl


def run(config: dict[str, BenchmarkConfig], inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    metrics = {}
    for name, benchmark in config.items():
        items = load_items(benchmark)
        write_jsonl(Path(out_dir) / f"{name}.jsonl", items)
        metrics[f"{name}_items"] = len(items)
        metrics[f"{name}_skills"] = len(Counter(item["skill"] for item in items))
    return Artifact.draft(out_dir, metrics, benchmarks=sorted(config))
