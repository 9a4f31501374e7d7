"""The full offline demo, as `make demo` runs it (minutes): SFT must lift the held-out exact-match
mean over skills by at least 30 points over the base model, every model of the run must appear in
the final table, and a second run must be all cache hits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.runs import find_run

REPO = Path(__file__).resolve().parents[1]
MODELS = ("base", "sft", "align-dpo", "student", "quantize-nf4", "quantize-int8")


def run_demo(root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain.cli", "run", "configs/demo.yaml", "--set", f"store_root={root}"]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_full_demo_sft_beats_base_by_30_points_and_reruns_from_cache(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record = find_run(tmp_path, "demo")
    results = record["results"]
    for model in MODELS:
        assert results[model]["mean"]["exact_match"] >= 0
        assert any(line.startswith(f"{model} ") for line in first.stdout.splitlines())  # a row of the printed results table
    assert results["sft"]["mean"]["exact_match"] >= results["base"]["mean"]["exact_match"] + 0.30, results
    assert record["gate"]["decision"] == "promoted"  # a fresh store has no champion yet
    assert "gate: candidate" in first.stdout
    # Every later stage's own figure is in the final stage table.
    for figure in ("eval_accuracy=", "eval_implicit_reward_accuracy=", "agreement=", "nf4_size_ratio=", "int8_loss_delta="):
        assert figure in first.stdout

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    record = find_run(tmp_path, "demo")
    assert {info["state"] for info in record["stages"].values()} == {"cached"}
