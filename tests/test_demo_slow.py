"""The full offline demo, as `make demo` runs it (minutes): SFT must lift the held-out exact-match
mean over skills by at least 30 points over the base model; each align method must gain at least 5
points on the targeted skills, lose at most 3 on every other skill, not lower the overall mean, and
move away from the SFT model (KL > 0) without a reward-hacking flag; every model of the run must
appear in the final table, and a second run must be all cache hits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.runs import find_run

REPO = Path(__file__).resolve().parents[1]
MODELS = ("base", "sft", "align-dpo", "align-ppo", "align-grpo", "student", "quantize-nf4", "quantize-int8")
ALIGNED = ("align-dpo", "align-ppo", "align-grpo")
TARGETED = ("sort", "add")  # configs/demo.yaml: align.target_skills
OTHERS = ("copy", "reverse", "upper", "max")


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
    sft = results["sft"]
    for method in ALIGNED:
        row = results[method]
        targeted = sum(row[task]["exact_match"] for task in TARGETED) / 2
        assert targeted >= sum(sft[task]["exact_match"] for task in TARGETED) / 2 + 0.05, (method, row)
        for task in OTHERS:
            assert row[task]["exact_match"] >= sft[task]["exact_match"] - 0.03 - 1e-9, (method, task)
        assert row["mean"]["exact_match"] >= sft["mean"]["exact_match"], method
        stage = record["stages"][method]
        assert stage["metrics"]["final_kl"] > 0, method
        manifest = json.loads((tmp_path / stage["path"] / "manifest.json").read_text())
        assert not (manifest.get("reward_hacking") or {}).get("flag"), method
    assert record["gate"]["decision"] == "promoted"  # a fresh store has no champion yet
    assert "gate: candidate" in first.stdout
    # Every later stage's own figure is in the final stage table.
    for figure in ("eval_accuracy=", "eval_implicit_reward_accuracy=", "gold_reward_last=", "zero_variance_fraction=", "agreement=", "nf4_size_ratio=", "int8_loss_delta="):
        assert figure in first.stdout

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    record = find_run(tmp_path, "demo")
    assert {info["state"] for info in record["stages"].values()} == {"cached"}
