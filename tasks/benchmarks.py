"""Benchmarks stage: materialise every configured benchmark task as `<task>.jsonl` held-out items.

    run(BenchmarksConfig(tasks=["copy", "gsm8k"]), {}, out_dir)   # -> copy.jsonl, gsm8k.jsonl, tasks.json

Each task is a YAML file (configs/benchmarks/, posttrain.benchmarks); its bytes and the data file
it reads are outside inputs of this stage's cache key. Making the items an artifact gives them a
digest: the data stage decontaminates against exactly these items (scored and calibration ones)
and each evaluate-<model> stage scores exactly these items; changing a task re-runs those, and
nothing else. `tasks.json` holds every task's spec (message, extractor, metrics, version), so
evaluation reads how to score from the artifact, not from files that may have moved on.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posttrain.artifacts import Artifact
from posttrain.benchmarks import load_task, task_items
from posttrain.config import BenchmarksConfig
from posttrain.jsonl import write_jsonl


def run(config: BenchmarksConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    metrics, specs = {}, {}
    for name in config.tasks:
        task = load_task(name)
        if task.name in specs:
            raise ValueError(f"benchmarks.tasks: two tasks are named {task.name!r}")
        items = task_items(task, calibration=config.calibration_items if task.kind == "generation" else 0, items=config.items)
        write_jsonl(Path(out_dir) / f"{task.name}.jsonl", items)
        splits = Counter(item["split"] for item in items)
        metrics[f"{task.name}_items"] = splits["score"]
        metrics[f"{task.name}_calibration_items"] = splits["calibration"]
        specs[task.name] = task.model_dump(mode="json", exclude={"file"})
    (Path(out_dir) / "tasks.json").write_text(json.dumps(specs, indent=2, sort_keys=True))
    return Artifact.draft(out_dir, metrics, benchmarks=list(specs))
