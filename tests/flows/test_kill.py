"""kill -9 of a running pipeline: nothing it started outlives it, the run reads as failed in its
record and (after the next run) in MLflow, and the next run reuses what was finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from posttrain.watchdog import process_start_time
from tests.kill_harness import REPO, carries_marker_of, children, cli, listening_sockets, wait_for


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the watchdog reads /proc (Linux)")
def test_kill_9_mid_stage_leaves_no_process_and_a_failed_run(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["configs/demo.yaml", "--set", f"store_root={root}", "--until", "data"]
    run = subprocess.Popen(cli("run", *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def data_running() -> dict | None:
        for path in (root / "runs").glob("*/run.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record["stages"].get("data", {}).get("state") == "running":
                return record
        return None

    record = wait_for(data_running, 240, "the data stage to start")
    started = [pid for pid in children(run.pid) if process_start_time(pid)]
    assert started, "the run has child processes (Prefect's server, the watchdog)"
    # Servers bind the loopback only: Prefect's API server is the one the run starts.
    listening = wait_for(lambda: listening_sockets([run.pid, *started]), 30, "the run's API server to listen")
    assert all(address.startswith("127.0.0.1:") for address in listening), listening
    run.send_signal(signal.SIGKILL)
    run.wait()
    # Everything the run started is stopped by the watchdog (SIGTERM, SIGKILL after 5 s), which then exits.
    wait_for(lambda: not carries_marker_of(run.pid), 20, "the run's processes to be stopped")
    assert all(process_start_time(pid) is None for pid in started), "a child of the killed run is still alive"

    path = root / "runs" / record["run_id"] / "run.json"
    dead = wait_for(lambda: json.loads(path.read_text())["status"] == "failed" and json.loads(path.read_text()), 10, "the record to say failed")
    assert f"pid {run.pid}) died" in dead["error"]
    assert dead["stages"]["data"]["state"] == "failed" and dead["stages"]["base"]["state"] in ("built", "cached")
    status = subprocess.run(cli("status", record["run_id"], "--root", str(root)), cwd=REPO, env=env, capture_output=True, text=True)
    assert status.returncode == 1

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(dead["mlflow_parent_run_id"]).info.status == "RUNNING"  # until the next run closes it
    again = subprocess.run(cli("run", *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_run(dead["mlflow_parent_run_id"]).info.status == "FAILED"
    children_of_dead = client.search_runs([client.get_run(dead["mlflow_parent_run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{dead['mlflow_parent_run_id']}'")
    assert children_of_dead and all(child.info.status != "RUNNING" for child in children_of_dead)
    assert json.loads(path.read_text())["mlflow_closed"] is True
    newest = json.loads(max((root / "runs").glob("*/run.json"), key=lambda p: json.loads(p.read_text())["started_at"]).read_text())
    assert newest["stages"]["base"]["state"] == "cached" and newest["stages"]["data"]["state"] == "built"
