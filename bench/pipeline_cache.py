"""Time the pipeline cold, unchanged (all cache hits, new process) and after an evaluate-only change;
then the unchanged re-run again against running servers.

    .venv/bin/python bench/pipeline_cache.py                       # configs/smoke.yaml
    .venv/bin/python bench/pipeline_cache.py configs/demo.yaml     # the full demo (~7 min cold)

Each run is a fresh `posttrain run` process, as a user would start it, so the figures include
interpreter start-up, imports, Prefect's temporary API server (or the client of a running one) and
MLflow logging. The unchanged re-run is timed three times each way (median shown): with no server
(Prefect's temporary server, MLflow in the store's SQLite file), and against a running
`prefect server start` and `mlflow server` on 127.0.0.1 (after one warm-up run that logs the
stages there), and against the servers once more with `runtime.parallel_stages: 1` (the cached
stages logged one after another, the plan's order). Prints a table with each run's wall time and its ratio to the cold run.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import urllib.request
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.runs import find_run  # noqa: E402


def timed_run(config: str, root: Path, *overrides: str, env: dict | None = None) -> tuple[float, dict]:
    command = [sys.executable, "-m", "posttrain.cli", "run", config, "--set", f"store_root={root}"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    return seconds, find_run(root, Path(config).stem)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], url: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{command[0]} did not start: {log.read_text()[-2000:]}")


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/smoke.yaml"
    root = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    rows = []
    cold, record = timed_run(config, root)
    rows.append(("cold (every stage built)", cold, record))
    warm, record = timed_run(config, root)
    rows.append(("unchanged re-run (new process)", warm, record))
    warm_runs = [warm] + [timed_run(config, root)[0] for _ in range(2)]
    rows[-1] = ("unchanged re-run, no server (median of 3)", statistics.median(warm_runs), record)

    # The same re-run against running servers, as a team runs it.
    work = Path(tempfile.mkdtemp(prefix="posttrain-servers-"))
    bin_dir = Path(sys.executable).parent
    prefect_port, mlflow_port = free_port(), free_port()
    servers = [
        start_server([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--no-services"],
                     f"http://127.0.0.1:{prefect_port}/api/health", work / "prefect.log", {"PREFECT_HOME": str(work / "prefect")}),
        start_server([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--backend-store-uri",
                      f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", (work / "mlartifacts").as_uri()],
                     f"http://127.0.0.1:{mlflow_port}/health", work / "mlflow.log"),
    ]
    try:
        server_env = {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
        tracking = f"tracking.uri=http://127.0.0.1:{mlflow_port}"
        timed_run(config, root, tracking, env=server_env)  # warm-up: the stages' runs are logged on this server once
        with_servers = [timed_run(config, root, tracking, env=server_env) for _ in range(3)]
        rows.append(("unchanged re-run, servers running (median of 3)", statistics.median(s for s, _ in with_servers), with_servers[-1][1]))
        serial = [timed_run(config, root, tracking, "runtime.parallel_stages=1", env=server_env) for _ in range(3)]
        rows.append(("  the same, one stage at a time (median of 3)", statistics.median(s for s, _ in serial), serial[-1][1]))
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    evaluate_only, record = timed_run(config, root, "evaluate.max_new_tokens=9")
    rows.append(("evaluate.max_new_tokens changed", evaluate_only, record))

    print(f"config: {config}   store: {root}")
    print(f"{'run':<50} {'seconds':>8} {'vs cold':>8}  stages built")
    for label, seconds, record in rows:
        built = [stage for stage, info in record["stages"].items() if info["state"] == "built"]
        print(f"{label:<50} {seconds:>8.1f} {seconds / cold:>8.2f}  {', '.join(built) or '-'}")
    print("unchanged re-runs, no server: " + ", ".join(f"{s:.1f}" for s in warm_runs) + "; servers: " + ", ".join(f"{s:.1f}" for s, _ in with_servers)
          + "; servers, one stage at a time: " + ", ".join(f"{s:.1f}" for s, _ in serial))
    stage_seconds = {stage: info["seconds"] for stage, info in rows[0][2]["stages"].items()}
    print("cold run, seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items()))


if __name__ == "__main__":
    main()
