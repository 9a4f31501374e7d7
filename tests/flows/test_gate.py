"""The promotion gate through the real CLI, flow and MLflow registry, on one smoke store.

The smoke models score 0 exact match, so the runs use `gate.primary_metric: reward_mean` (the
run's reward model's mean score of each model's greedy replies), which differs between models.
A first run with the gate off scores every model; then the runs name the candidate: the worst
model (promoted: no champion yet), the best (promoted: it beats the champion, re-scored in that
run), the worst again (kept: worse), a model with a synthetic reward-hacking flag in its manifest
(kept: flagged), a candidate whose quantized variant is worse than the budget allows (kept), and
last a promotion by hand. On the smoke models a variant's greedy replies equal its source's, so the
budget run ranks by `completion_loss` (lower is better), which 4-bit quantization does move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.runs import find_run

REPO = Path(__file__).resolve().parents[2]
GATE = ["--set", "gate.primary_metric=reward_mean"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def run(root: Path, candidate: str, *extra: str) -> dict:
    result = cli("run", "configs/smoke.yaml", "--set", f"store_root={root}", *GATE, "--set", f"gate.candidate={candidate}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return find_run(root, "smoke")


def champion(root: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return client.get_model_version_by_alias("smoke", "champion")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gate")


def test_the_gate_promotes_better_keeps_worse_refuses_flagged_and_records_why(root):
    first = run(root, "sft", "--set", "gate.enabled=false")  # every model scored, nothing promoted yet
    assert "gate" not in first
    scores = {m: first["results"][m]["mean"]["reward_mean"] for m in ("base", "sft", "align-dpo", "student")}
    distinct = {}
    for model, score in scores.items():  # models with equal replies score the same: keep one of each
        distinct.setdefault(score, model)
    assert len(distinct) >= 3, scores  # three different scores, so every branch below is reached
    worst, middle, best = (distinct[score] for score in (sorted(distinct)[0], sorted(distinct)[1], sorted(distinct)[-1]))

    start = run(root, worst)
    assert (start["gate"]["decision"], start["gate"]["reason"]) == ("promoted", "no champion yet")
    assert champion(root).tags["posttrain.model"] == worst

    better = run(root, best)
    assert better["gate"]["decision"] == "promoted", better["gate"]
    assert better["gate"]["champion_score"] == pytest.approx(scores[worst])  # re-scored, not read from a tag
    assert better["gate"]["reason"].startswith("beats the champion")
    version = champion(root)
    assert version.tags["posttrain.model"] == best
    assert version.tags["posttrain.gate.decision"] == "promoted"
    assert float(version.tags["posttrain.gate.candidate_score"]) == pytest.approx(scores[best])

    worse = run(root, worst)
    assert worse["gate"]["decision"] == "kept champion" and "does not beat the champion" in worse["gate"]["reason"]
    assert champion(root).version == version.version

    # A synthetic flag in the middle model's manifest: the gate must refuse it whatever it scores.
    stage = {"student": "distill"}.get(middle, middle)
    manifest_path = root / worse["stages"][stage]["path"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["reward_hacking"] = {"flag": True, "proxy_delta": 0.3, "gold_delta": -0.1, "window": 10}
    manifest_path.write_text(json.dumps(manifest))
    flagged = run(root, middle)
    assert flagged["gate"]["decision"] == "kept champion" and flagged["gate"]["reason"].startswith("reward hacking flagged")
    assert champion(root).version == version.version

    # Over the quantization budget: the NF4 variant of a model that is not the champion has a higher
    # completion loss than the model itself.
    # (quantize.source candidate: the named candidate is quantized; the student is too narrow for NF4.)
    other = "align-dpo" if best != "align-dpo" else "sft"
    # (tracking.log_models false: the new variants are registered as references to their store folders.)
    lossy = run(
        root, other, "--set", "gate.primary_metric=completion_loss", "--set", "gate.quantized_budget=0", "--set", "quantize.source=candidate",
        "--set", "tracking.log_models=false",
    )
    nf4, source = (lossy["results"][m]["mean"]["completion_loss"] for m in ("quantize-nf4", other))
    assert nf4 > source
    assert lossy["gate"]["decision"] == "kept champion"
    assert lossy["gate"]["reason"] == f"its quantized variant drops {nf4 - source:.4f} (budget 0.0000)"
    assert champion(root).version == version.version
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (reference,) = client.search_model_versions(f"name = 'smoke' and tags.`posttrain.run_id` = '{lossy['run_id']}' and tags.`posttrain.model` = 'quantize-nf4'")
    assert reference.tags["posttrain.store_path"] == f"{lossy['stages']['quantize']['path']}/nf4"
    assert client.list_logged_model_artifacts(reference.source.removeprefix("models:/")) == []  # no bytes uploaded

    # By hand: recorded as such on the version.
    result = cli("promote", lossy["run_id"], "--model", worst, "--root", str(root), "--reason", "rollback drill")
    assert result.returncode == 0, result.stderr
    manual = champion(root)
    assert manual.tags["posttrain.model"] == worst and manual.tags["posttrain.gate.decision"] == "promoted by hand"
    assert manual.tags["posttrain.gate.reason"] == "rollback drill"
    status = json.loads(cli("status", flagged["run_id"], "--json", "--root", str(root)).stdout)
    assert status["gate"]["reason"] == flagged["gate"]["reason"]
