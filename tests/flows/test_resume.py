"""`posttrain resume` after a kill -9 mid-SFT continues from the last checkpoint and ends with the
weights of an uninterrupted run; `posttrain rerun --from` rebuilds one stage and what follows it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest

from tests.kill_harness import newest_record, run_cli, run_killed_at

SFT = ["--set", "sft.max_steps=12", "--set", "sft.checkpoint_every=4", "--until", "sft"]


def sft_folder(root: Path, record: dict) -> Path:
    return root / record["stages"]["sft"]["path"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the watchdog reads /proc (Linux)")
def test_resume_after_a_kill_mid_sft_ends_with_the_uninterrupted_weights(tmp_path, prefect_api):
    server = {"PREFECT_API_URL": prefect_api}
    clean_root, root = tmp_path / "uninterrupted", tmp_path / "killed"
    clean = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={clean_root}", *SFT], env=server)
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = newest_record(clean_root)

    # Killed inside step 10: the checkpoint of step 8 is complete, steps 9 and 10 are lost.
    killed = run_killed_at("sft:train-step@10", ["run", "configs/smoke.yaml", "--set", f"store_root={root}", *SFT], root, env=server)
    assert killed["stages"]["sft"]["state"] == "failed"
    (checkpoint,) = (root / "checkpoints" / "sft").glob("*/checkpoint-*")
    assert checkpoint.name == "checkpoint-8" and (checkpoint / "optimizer.pt").is_file() and (checkpoint / "rng_state.pth").is_file()

    resumed = run_cli(["resume", killed["run_id"], "--root", str(root)], env=server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {killed['run_id']}" in resumed.stdout
    record = json.loads((root / "runs" / killed["run_id"] / "run.json").read_text())
    assert record["status"] == "succeeded" and len(record["resumes"]) == 1 and "died" in record["resumes"][0]["previous_error"]
    assert [record["stages"][name]["state"] for name in ("base", "benchmarks", "data", "sft")] == ["cached", "cached", "cached", "built"]
    metrics = record["stages"]["sft"]["metrics"]
    assert metrics["optimizer_steps"] == 12 and metrics["resumed_from_step"] == 8  # the plan's steps, not 12 more nor 4
    assert expected["stages"]["sft"]["metrics"]["resumed_from_step"] == 0
    # The same weights, optimizer path and logged losses as the run that was never killed.
    assert sha256(sft_folder(root, record) / "model.safetensors") == sha256(sft_folder(clean_root, expected) / "model.safetensors")
    assert (sft_folder(root, record) / "loss_history.json").read_text() == (sft_folder(clean_root, expected) / "loss_history.json").read_text()
    assert record["stages"]["sft"]["fingerprint"] == expected["stages"]["sft"]["fingerprint"]
    assert not list((root / "checkpoints" / "sft").glob("*/*")), "checkpoints are removed once the stage is published"

    # One MLflow parent run for the whole run, attempts and all.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(killed["mlflow_parent_run_id"])
    assert record["mlflow_parent_run_id"] == killed["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags["posttrain.attempts"] == "2"
    assert client.get_run(record["stages"]["sft"]["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent.info.run_id

    again = run_cli(["resume", killed["run_id"], "--root", str(root)], env=server)
    assert again.returncode == 2 and "succeeded; nothing to resume" in again.stderr


@pytest.mark.slow
def test_rerun_from_a_stage_rebuilds_it_and_what_follows_and_keeps_the_rest(tmp_path, prefect_api):
    server = {"PREFECT_API_URL": prefect_api}
    root = tmp_path / "root"
    first = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={root}", "--until", "reward"], env=server)
    assert first.returncode == 0, first.stderr[-3000:]
    original = newest_record(root)
    rerun = run_cli(["rerun", original["run_id"], "--from", "sft", "--root", str(root)], env=server)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = newest_record(root)
    assert record["run_id"] != original["run_id"] and record["rerun_of"] == original["run_id"] and record["rerun_from"] == "sft"
    states = {name: info["state"] for name, info in record["stages"].items()}
    assert states == {"base": "cached", "benchmarks": "cached", "data": "cached", "sft": "built", "reward": "built"}
    # Rebuilt on the CPU with the same seed: the same bytes, so the published folders stay in place.
    assert {name: info["path"] for name, info in record["stages"].items()} == {name: info["path"] for name, info in original["stages"].items()}
    assert not (root / "replaced").exists()

    unknown = run_cli(["rerun", original["run_id"], "--from", "sftt", "--root", str(root)], env=server)
    assert unknown.returncode == 2 and "--from sftt: not a stage of this run" in unknown.stderr
