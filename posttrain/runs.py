"""Run records: `runs/<run id>/run.json`, one per pipeline run, never overwritten by a later run.

    record = RunRecord.start(root, cfg, config_path, overrides)    # a new id: demo-20261202-101500-3f2a
    record.stage_started("sft", fingerprint)
    record.stage_finished("sft", {...})
    record.finish("succeeded")
    find_run(root, "demo")          # the newest run named demo (or a run id, or None: the newest)

A record holds the resolved config, the `--set` overrides, the config file's sha256, the process
that ran it (host, pid), and per stage its fingerprint, state (running, built, cached, failed),
start and end times, seconds, store path, MLflow run and key metrics. It is rewritten atomically
after every stage, so it is always readable, even while the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from posttrain.artifacts import write_json_atomic
from posttrain.watchdog import process_start_time

RECORD = "run.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(run_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{run_name}-{stamp}-{secrets.token_hex(2)}"


class RunRecord:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = Path(path), data
        self._lock = threading.RLock()  # stages in flight at once each update their entry
        self._plan_order: list[str] = []

    @classmethod
    def start(cls, root: Path, cfg, config_path: str, overrides: list[str], config_text: str) -> "RunRecord":
        run_id = new_run_id(cfg.run_name)
        data = {
            "run_id": run_id,
            "run_name": cfg.run_name,
            "status": "running",
            "started_at": now(),
            "config_path": str(config_path),
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "overrides": list(overrides),
            "config": cfg.model_dump(mode="json"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),  # with the pid, names this process (pids are reused)
            "stages": {},
        }
        record = cls(Path(root) / "runs" / run_id / RECORD, data)
        record.save()
        return record

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        return cls(Path(path), json.loads(Path(path).read_text()))

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, self.data, sort_keys=False)

    def update(self, **fields) -> None:
        with self._lock:
            self.data.update(fields)
            self.save()

    def plan(self, stages: list[str]) -> None:
        """The order `stages` keeps (the plan's), whatever order stages in flight at once start in."""
        with self._lock:
            self._plan_order += [stage for stage in stages if stage not in self._plan_order]

    def stage_started(self, stage: str, fingerprint: str | None) -> None:
        with self._lock:
            stages = {**self.data["stages"], stage: {"state": "running", "fingerprint": fingerprint, "started_at": now()}}
            rank = {name: index for index, name in enumerate(self._plan_order)}
            # Stages of the plan in its order; any other (the champion's evaluation) after them, as they came.
            self.data["stages"] = dict(sorted(stages.items(), key=lambda item: rank.get(item[0], len(rank))))
            self.save()

    def stage_update(self, stage: str, fields: dict) -> None:
        """Fields of a stage still in flight (its fingerprint, waiting for its turn)."""
        with self._lock:
            self.data["stages"][stage] = {**self.data["stages"][stage], **fields}
            self.save()

    def stage_finished(self, stage: str, fields: dict) -> None:
        with self._lock:
            self.data["stages"][stage] = {**self.data["stages"][stage], **fields, "finished_at": now()}
            self.save()

    def finish(self, status: str) -> None:
        with self._lock:
            self.data["status"] = status
            self.data["finished_at"] = now()
            self.save()

    def reopen(self) -> None:
        """`posttrain resume`: the same run goes on in this process; the failure it resumes from
        is kept in `resumes`."""
        self.data.setdefault("resumes", []).append(
            {"at": now(), "pid": os.getpid(), "host": socket.gethostname(), "previous_error": self.data.pop("error", None)}
        )
        self.data.pop("finished_at", None)
        self.data.update(status="running", pid=os.getpid(), pid_start=process_start_time(os.getpid()), host=socket.gethostname(), mlflow_closed=False)
        self.save()

    def mark_failed(self, error: str) -> None:
        """Failed with `error`, and the stage in flight with it (a crash, a kill, a lost server)."""
        for info in self.data.get("stages", {}).values():
            if info.get("state") == "running":
                info.update(state="failed", finished_at=now())
        self.data["error"] = error
        self.finish("failed")


def is_dead(record: dict) -> bool:
    """A record that says "running" whose process is gone (on this host: its pid with its start
    time no longer exists). The watchdog normally marks such a run failed; this covers a watchdog
    killed together with the run."""
    if record.get("status") != "running" or record.get("host") != socket.gethostname() or "pid" not in record:
        return False
    started = process_start_time(record["pid"])
    return started is None or (record.get("pid_start") is not None and started != record["pid_start"])


def list_runs(root: Path) -> list[dict]:
    """Every readable run record under the store root, oldest first."""
    records = []
    for path in (Path(root) / "runs").glob(f"*/{RECORD}"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if is_dead(record):
            record["status"] = "dead"  # as read, not written: the next run or the watchdog records it
        records.append(record)
    return sorted(records, key=lambda record: (record.get("started_at", ""), record.get("run_id", "")))


def find_run(root: Path, name_or_id: str | None) -> dict | None:
    """A run by id, else the newest run of that name, else (None given) the newest run."""
    runs = list_runs(root)
    if name_or_id is None:
        return runs[-1] if runs else None
    for record in runs:
        if record.get("run_id") == name_or_id:
            return record
    named = [record for record in runs if record.get("run_name") == name_or_id]
    return named[-1] if named else None


def mark_dead_runs_failed(root: Path) -> list[str]:
    """Record every dead run under the store root as failed (what `status` and the next `resume`
    read); its MLflow runs are closed by the tracking set-up of the run that calls this."""
    marked = []
    for path in (Path(root) / "runs").glob(f"*/{RECORD}"):
        try:
            record = RunRecord.load(path)
        except (OSError, json.JSONDecodeError):
            continue
        if not is_dead(record.data):
            continue
        record.mark_failed(f"the run's process (pid {record.data['pid']}) died before the run finished (found by a later run)")
        marked.append(record.run_id)
    return marked
