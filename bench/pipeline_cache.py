"""Time the pipeline cold, unchanged (all cache hits, new process) and after an evaluate-only change.

    .venv/bin/python bench/pipeline_cache.py                       # configs/smoke.yaml
    .venv/bin/python bench/pipeline_cache.py configs/demo.yaml     # the full demo (~10 min cold)

Each run is a fresh `posttrain run` process, as a user would start it, so the figures include
interpreter start-up, imports, Prefect's temporary API server and MLflow logging. Prints a table
with each run's wall time and its ratio to the cold run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.runs import find_run  # noqa: E402


def timed_run(config: str, root: Path, *overrides: str) -> tuple[float, dict]:
    command = [sys.executable, "-m", "posttrain.cli", "run", config, "--set", f"store_root={root}"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return seconds, find_run(root, Path(config).stem)


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/smoke.yaml"
    root = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    rows = []
    cold, record = timed_run(config, root)
    rows.append(("cold (every stage built)", cold, record))
    warm, record = timed_run(config, root)
    rows.append(("unchanged re-run (new process)", warm, record))
    evaluate_only, record = timed_run(config, root, "evaluate.max_new_tokens=9")
    rows.append(("evaluate.max_new_tokens changed", evaluate_only, record))

    print(f"config: {config}   store: {root}")
    print(f"{'run':<34} {'seconds':>8} {'vs cold':>8}  stages built")
    for label, seconds, record in rows:
        built = [stage for stage, info in record["stages"].items() if info["state"] == "built"]
        print(f"{label:<34} {seconds:>8.1f} {seconds / cold:>8.2f}  {', '.join(built) or '-'}")
    stage_seconds = {stage: info["seconds"] for stage, info in rows[0][2]["stages"].items()}
    print("cold run, seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items()))


if __name__ == "__main__":
    main()
