"""Scheduled retraining against a real `prefect server start`: `posttrain schedule` makes the
deployment, `posttrain worker` (prefect's process worker, in its own working directory) runs it.
Triggered with run_deployment, not by waiting for the cron.

Checked: a run completes and promotes a first champion (webhook: promoted); the same run again is
all cache hits and says "nothing changed" (no notification); rows appended to a source rebuild data
and everything downstream; a run that fails sends "failed".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from posttrain import skills
from posttrain.jsonl import write_jsonl
from tests.kill_harness import REPO, newest_record, start_worker, stop_group, wait_for


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def trigger(env: dict, deployment: str, parameters: dict | None = None) -> dict:
    """run_deployment from a separate process (as a user or another system would), waiting for the end."""
    code = (
        "import json, sys; from prefect.deployments import run_deployment; "
        f"run = run_deployment({deployment!r}, parameters={parameters!r}, timeout=600); "
        "print(json.dumps({'state': run.state.type.value, 'name': run.state.name}))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=700)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_schedule_a_deployment_and_let_a_worker_run_it(tmp_path, prefect_api):
    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.received.clear()

    source = tmp_path / "instructions.jsonl"
    rows, _ = skills.generate_rows("instruction", rows=600, seed=0)
    write_jsonl(source, rows)
    store = tmp_path / "store"
    smoke = (REPO / "configs" / "smoke.yaml").read_text()
    config = tmp_path / "scheduled.yaml"
    config.write_text(
        smoke.replace("store_root: artifacts/smoke", f"store_root: {store}")
        .replace("- role: instruction\n      generate: {kind: skills, rows: 600, seed: 0}", f"- {{role: instruction, path: {source}, format: instruction}}")
    )
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api,
        "POSTTRAIN_WEBHOOK_URL": f"http://127.0.0.1:{receiver.server_port}/hook",
    }
    pool = f"pool-{tmp_path.name[-12:]}".replace("_", "-")
    made = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "schedule", str(config), "--cron", "0 3 * * 1", "--pool", pool, "--name", "weekly"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert "posttrain-scheduled/weekly" in made.stdout and "one run at a time" in made.stdout

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("posttrain-scheduled/weekly")
        assert deployment.work_pool_name == pool
        assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * 1"]
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1

    workdir = tmp_path / "worker"
    workdir.mkdir()
    worker = start_worker(pool, workdir, env, tmp_path / "worker.log")
    try:
        first = trigger(env, "posttrain-scheduled/weekly")
        assert first["state"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        record = newest_record(store)
        assert record["trigger"] == "deployment" and record["status"] == "succeeded" and record["changed"] is True
        assert all(info["state"] == "built" for info in record["stages"].values())
        assert [event["event"] for event in Receiver.received] == ["promoted"]
        assert Receiver.received[0]["run_id"] == record["run_id"] and Receiver.received[0]["model"] == record["gate"]["candidate"]

        again = trigger(env, "posttrain-scheduled/weekly")
        assert again["state"] == "COMPLETED"
        record = newest_record(store)
        assert record["changed"] is False and all(info["state"] == "cached" for info in record["stages"].values())
        # The flow run's log line reaches the worker's output a moment after the run is reported complete.
        wait_for(lambda: "nothing changed" in (tmp_path / "worker.log").read_text(), 60, "the worker to log 'nothing changed'")
        assert len(Receiver.received) == 1  # no new champion, nothing failed: nothing sent

        more, _ = skills.generate_rows("instruction", rows=60, seed=7)
        with source.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in more)
        changed = trigger(env, "posttrain-scheduled/weekly")
        assert changed["state"] == "COMPLETED"
        record = newest_record(store)
        states = {name: info["state"] for name, info in record["stages"].items()}
        assert states["base"] == states["benchmarks"] == "cached"
        assert states["data"] == states["sft"] == states["reward"] == states["report"] == "built"

        source.unlink()  # the source is gone by the next run
        failed = trigger(env, "posttrain-scheduled/weekly")
        assert failed["state"] == "FAILED"
        assert Receiver.received[-1]["event"] == "failed" and "instructions.jsonl: no such file" in Receiver.received[-1]["error"], Receiver.received[-1]
        assert env["POSTTRAIN_WEBHOOK_URL"] not in (tmp_path / "worker.log").read_text()  # a secret: never logged
    finally:
        stop_group(worker)
        receiver.shutdown()
