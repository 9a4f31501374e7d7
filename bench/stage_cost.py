"""Cost that scales with the work, not the corpus: the data stage's rows/s and each training stage's
fixed cost on configs/alpaca-hh.yaml (Alpaca 52k + hh-rlhf helpful-base, 54k rows in), with every
training stage cut to 2 optimizer steps.

    .venv/bin/python bench/stage_cost.py                 # a fresh store in a temporary folder
    .venv/bin/python bench/stage_cost.py --steps 20      # the same, 20 steps per stage

Runs `posttrain run` as a user would (one process per target, the store shared so finished stages
are cache hits), `--until` each of quantize, reward, align-dpo and distill, then reads each built
stage's wall time and its own training-loop time from the run records. Fixed cost = the stage's
wall time minus its training loop: reading and encoding rows, the tokenized contract, the eval
figures over the configured eval rows, loading and saving models. The data stage's figure is its
own work measured inside the stage (rows in / seconds, the tokenizer and Great Expectations already
imported by the process), with its phases: once in the pipeline run, where the run's Prefect
server and the MLflow logging of the stages before it share the two cores, and `--repeats` times
alone, as `python -m tasks.data` on the same inputs. Goals (training-stages issue): data >= 20k
rows/s; each training stage's fixed cost <= 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.runs import find_run  # noqa: E402

CONFIG = "configs/alpaca-hh.yaml"
TARGETS = ("quantize", "reward", "align-dpo", "distill")
TRAINING = ("sft", "reward", "align-dpo", "distill")
PHASES = ("ingest", "filter", "dedup", "decontaminate", "split", "contracts")


def run_until(root: Path, target: str, steps: int) -> dict:
    overrides = [f"store_root={root}", f"sft.max_steps={steps}", f"reward.max_steps={steps}", f"align.dpo.max_steps={steps}", f"distill.max_steps={steps}"]
    command = [sys.executable, "-m", "posttrain.cli", "run", CONFIG, "--until", target]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"posttrain run --until {target} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  --until {target}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return find_run(root, Path(CONFIG).stem)["stages"]


def data_alone(root: Path, built: dict, repeats: int) -> list[dict]:
    """The data stage as its own process (`python -m tasks.data`) on the run's base and benchmarks:
    its own work, without the run's Prefect server starting or other stages' MLflow logging on the
    same two cores. Its metrics, once per repeat."""
    from posttrain.config import load_config

    section = load_config(REPO / CONFIG).data
    runs = []
    with tempfile.TemporaryDirectory(prefix="data-alone-") as folder:
        config, inputs = Path(folder) / "data.json", Path(folder) / "inputs.json"
        config.write_text(section.model_dump_json())
        inputs.write_text(json.dumps({name: str(root / built[name]["path"]) for name in ("base", "benchmarks")}))
        for attempt in range(repeats):
            out = Path(folder) / f"out-{attempt}"
            command = [sys.executable, "-m", "tasks.data", "--config", str(config), "--inputs", str(inputs), "--out", str(out)]
            subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
            runs.append(json.loads((out / "_draft.json").read_text())["metrics"])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the data stage alone (0: none)")
    args = parser.parse_args()
    built: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="stage-cost-") as folder:
        for target in TARGETS:
            for name, stage in run_until(Path(folder), target, args.steps).items():
                if stage.get("state") == "built" and name not in built:
                    built[name] = stage

        alone = data_alone(Path(folder), built, args.repeats)
    data = built["data"]["metrics"]
    print(f"\ndata stage, {CONFIG}: {data['rows_in']:,} rows in, {data['rows_out']:,} out, {data.get('worker_processes', 1)} worker processes")
    print(f"{'run':<24} {'seconds':>8} {'rows/s':>9}   (inside the stage; goal >= 20,000 rows/s)")
    print(f"{'in the pipeline run':<24} {data['seconds']:>8.2f} {data['rows_per_second']:>9,.0f}")
    for attempt, metrics in enumerate(alone, start=1):
        print(f"{f'alone, run {attempt}':<24} {metrics['seconds']:>8.2f} {metrics['rows_per_second']:>9,.0f}")
    if alone:
        middle = statistics.median(metrics["seconds"] for metrics in alone)
        print(f"{'alone, median':<24} {middle:>8.2f} {data['rows_in'] / middle:>9,.0f}")
    print("phase seconds, in the pipeline run (summed over the processes that ran them, so they add up to more than the stage):")
    print("  " + "  ".join(f"{phase} {data[f'{phase}_seconds']:.2f}" for phase in PHASES))

    print(f"\ntraining stages at {args.steps} steps (seconds; fixed = wall - training loop; goal: fixed <= 15)")
    print(f"{'stage':<10} {'wall':>7} {'loop':>7} {'fixed':>7} {'rows used':>10} {'of rows':>8}")
    for name in (*TRAINING, "quantize"):
        if name not in built:
            continue
        metrics = built[name]["metrics"]
        loop = metrics.get("train_seconds", 0.0)
        used = metrics.get("train_rows_used", metrics.get("train_rows", metrics.get("train_pairs", "")))
        available = metrics.get("train_rows_available", metrics.get("train_rows", ""))
        print(f"{name:<10} {built[name]['seconds']:>7.1f} {loop:>7.1f} {built[name]['seconds'] - loop:>7.1f} {used!s:>10} {available!s:>8}")


if __name__ == "__main__":
    main()
