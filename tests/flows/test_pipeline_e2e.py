"""End to end through the real Prefect flow and MLflow, each run in a new process (the CLI).

One store is shared by the tests of this module, in order: a first run builds every stage; an
unchanged second run is all cache hits; an evaluate-only change re-runs only evaluate; a reward
change leaves DPO cached.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["base", "benchmarks", "data", "sft", "reward", "align-dpo", "distill", "quantize", "evaluate"]


def posttrain(root: Path, *args: str, config: str = "configs/smoke.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain.cli", "run", config, "--set", f"store_root={root}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def record(root: Path) -> dict:
    return json.loads((root / "runs" / "smoke" / "run.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first_run(root):
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return record(root)


def test_first_run_builds_every_stage(first_run, root):
    assert first_run["status"] == "succeeded"
    assert list(first_run["stages"]) == STAGES
    assert all(info["state"] == "built" for info in first_run["stages"].values())
    for stage, info in first_run["stages"].items():
        manifest = json.loads((root / info["path"] / "manifest.json").read_text())
        assert manifest["fingerprint"] == info["fingerprint"]
        assert manifest["git"]["commit"]
        assert "torch" in manifest["versions"]
        assert manifest["path"] == f"store/{stage}/{info['fingerprint']}"  # relative paths
    evaluate = first_run["stages"]["evaluate"]["metrics"]
    for model in ("base", "sft", "align-dpo", "student", "quantize-nf4", "quantize-int8"):
        assert f"{model}.skills.mean" in evaluate


def test_mlflow_has_parent_and_one_child_per_stage(first_run, root):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = first_run["mlflow_parent_run_id"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(run.data.tags["posttrain.stage"] for run in children) == sorted(STAGES)
    by_stage = {run.data.tags["posttrain.stage"]: run for run in children}
    sft = by_stage["sft"]
    assert sft.data.params["max_steps"] == "8"
    assert "eval_loss" in sft.data.metrics
    assert sft.data.tags["posttrain.upstream.base"] == by_stage["base"].info.run_id
    assert sft.data.tags["posttrain.upstream.data"] == by_stage["data"].info.run_id
    assert sft.data.tags["posttrain.cache_hit"] == "false"
    assert sft.inputs.dataset_inputs, "sft logs the dataset it trained on"
    dpo_tags = by_stage["align-dpo"].data.tags
    assert "posttrain.upstream.reward" not in dpo_tags  # DPO does not depend on the reward model
    artifacts = {item.path for item in client.list_artifacts(sft.info.run_id)}
    assert {"manifest.json", "model"} <= artifacts


def test_second_run_in_new_process_is_all_cache_hits(first_run, root):
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    second = record(root)
    assert [info["state"] for info in second["stages"].values()] == ["cached"] * len(STAGES)
    for stage in STAGES:
        assert second["stages"][stage]["fingerprint"] == first_run["stages"][stage]["fingerprint"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    sft_child = client.get_run(second["stages"]["sft"]["mlflow_run_id"])
    assert sft_child.data.tags["posttrain.cache_hit"] == "true"
    assert sft_child.data.tags["posttrain.built_by_run"] == first_run["stages"]["sft"]["mlflow_run_id"]


def test_evaluate_only_change_reruns_only_evaluate(first_run, root):
    result = posttrain(root, "--set", "evaluate.max_new_tokens=6")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert states.pop("evaluate") == "built"
    assert set(states.values()) == {"cached"}


def test_reward_change_leaves_dpo_cached(first_run, root):
    result = posttrain(root, "--set", "reward.lr=5e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert states["reward"] == "built"
    assert states["align-dpo"] == "cached"
    assert states["sft"] == "cached"
    assert states["evaluate"] == "cached"  # evaluate scores generative models; the reward model is not one of them


def test_deleted_artifact_is_rebuilt_despite_prefect_cache(first_run, root):
    """A Prefect cache hit counts only while the stored manifest exists; an identical rebuild
    (same bytes, same digest) leaves everything downstream cached."""
    import shutil

    shutil.rmtree(root / first_run["stages"]["distill"]["path"])
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert states.pop("distill") == "built"
    assert set(states.values()) == {"cached"}
    assert (root / first_run["stages"]["distill"]["path"] / "manifest.json").is_file()


def test_status_shows_the_run(first_run, root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "status", "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0
    for stage in STAGES:
        assert stage in result.stdout


def test_bad_config_value_is_one_line_and_exit_2(root):
    result = posttrain(root, "--set", "sft.lr=fast")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1
    assert "sft.lr" in lines[0] and "Traceback" not in result.stderr
