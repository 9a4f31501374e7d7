"""Nothing a run starts outlives it, and a run whose process died reads as dead.

    watchdog.start(record_path)   # in `posttrain run`, before Prefect or any stage starts a process

`start` puts a marker in the environment, which every process the run starts inherits (Prefect's
temporary API server, stage subprocesses, their workers), and starts this module as a small
process in its own session. It polls the run's process; once that process is gone, however it
ended (a normal exit, an exception, `kill -9`), it stops every process still carrying the marker
(SIGTERM, then SIGKILL after 5 s) and, if the run record still says "running", marks it failed
with the reason. Its own session keeps it alive through a kill of the run's process group, and it
exits as soon as it has cleaned up. Linux only (it reads /proc); elsewhere `start` does nothing.

The MLflow side of a dead run is closed by the next run on the store (posttrain.tracking).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

MARKER = "POSTTRAIN_RUN_MARKER"
POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None if
    there is no such process or it has exited (a zombie waiting to be reaped). A pid alone can be
    reused; pid + start time names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def start(record_path: Path) -> subprocess.Popen | None:
    if not Path("/proc/self/stat").is_file():
        return None
    marker = f"{os.getpid()}-{secrets.token_hex(6)}"
    os.environ[MARKER] = marker
    command = [sys.executable, "-m", "posttrain.watchdog", str(os.getpid()), marker, str(record_path)]
    return subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def marked_processes(marker: str) -> list[int]:
    needle = f"\0{MARKER}={marker}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in b"\0" + environment + b"\0":
            found.append(int(entry.name))
    return found


def stop_marked(marker: str) -> int:
    """SIGTERM every marked process, SIGKILL what is left after the grace period; how many there were."""
    pids = marked_processes(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and marked_processes(marker):
        time.sleep(0.1)
    for pid in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def mark_dead(record_path: Path, pid: int, stopped: int) -> None:
    from posttrain.runs import RunRecord  # here: posttrain.runs imports this module

    try:
        record = RunRecord.load(record_path)
    except (OSError, json.JSONDecodeError):
        return
    if record.data.get("status") != "running":
        return  # the run finished and said so itself
    leftovers = f"; {stopped} process(es) it had started stopped" if stopped else ""
    record.mark_failed(f"the run's process (pid {pid}) died before the run finished{leftovers}")


def watch(pid: int, marker: str, record_path: Path) -> None:
    started = process_start_time(pid)
    while started is not None and process_start_time(pid) == started:
        time.sleep(POLL_SECONDS)
    stopped = stop_marked(marker)
    mark_dead(record_path, pid, stopped)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
