"""The kill harness: run the pipeline CLI, kill it at a chosen point, and look at what is left.

    record = run_killed_at("sft:train-step@3", args, root)   # the run SIGKILLs itself there; its record
    listening_sockets(pids)                                  # what a run's processes listen on

The point is a posttrain.failpoints name, so the kill lands at the same place every time; the
process dies by SIGKILL (no handler, no `finally`), as under `kill -9` or the OOM killer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from posttrain.watchdog import MARKER

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *args]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def carries_marker_of(pid: int) -> list[int]:
    needle = f"\0{MARKER}={pid}-".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in b"\0" + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def listening_sockets(pids: list[int]) -> list[str]:
    """"address:port" of every TCP socket in LISTEN state that one of `pids` holds open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                host = ".".join(str(b) for b in words) if width == 4 else words.hex()
                found.append(f"{host}:{int(port, 16)}")
    return found


def run_cli(args: list[str], failpoint: str | None = None, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("POSTTRAIN_FAILPOINT", None)
    if failpoint:
        env["POSTTRAIN_FAILPOINT"] = failpoint
    return subprocess.run(cli(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def newest_record(root: Path) -> dict:
    records = [json.loads(path.read_text()) for path in (root / "runs").glob("*/run.json")]
    return max(records, key=lambda record: record["started_at"])


def run_killed_at(failpoint: str, args: list[str], root: Path, env: dict[str, str] | None = None) -> dict:
    """Run until the process kills itself at `failpoint`; return its record once the watchdog has
    stopped every process it started and recorded it failed."""
    run = subprocess.Popen(cli(*args), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {}), "POSTTRAIN_FAILPOINT": failpoint},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == -signal.SIGKILL, f"the run was not killed at {failpoint} (exit {run.returncode}): {stderr[-2000:]}"
    wait_for(lambda: not carries_marker_of(run.pid), 20, "the killed run's processes to be stopped")
    record = newest_record(root)
    path = root / "runs" / record["run_id"] / "run.json"
    return wait_for(lambda: (data := json.loads(path.read_text()))["status"] == "failed" and data, 10, "the record to say failed")


def stop_group(process: subprocess.Popen, seconds: float = 30) -> None:
    """Stop a server or worker started with `start_new_session=True`, and everything it started:
    SIGTERM to its process group, SIGKILL if it is still there after `seconds`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_worker(pool: str, workdir: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`posttrain worker --pool POOL` in its own folder and process group (stop it with stop_group)."""
    return subprocess.Popen(
        cli("worker", "--pool", pool), cwd=workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_inside_step(monkeypatch, step: int, reaches_per_step: int = 1) -> None:
    """In-process stand-in for a kill: `failpoints.reach("train-step")` (after the gradients, before
    the update) raises at its `step × reaches_per_step`-th call, so optimizer step `step` never
    lands (PPO reaches the point once per minibatch update: epochs × minibatches per step)."""
    from posttrain import failpoints

    calls = {"n": 0}

    def reach(point, *args, **kwargs):
        calls["n"] += point == "train-step"
        if calls["n"] == step * reaches_per_step:
            raise KeyboardInterrupt(f"stopped inside step {step}")

    monkeypatch.setattr(failpoints, "reach", reach)
