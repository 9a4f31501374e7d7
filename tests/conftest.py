"""Shared fixtures: a tiny base model, tiny clean data and benchmark folders, as Artifacts.

They are written directly (not through the stages) so each stage's unit test depends only on its
own module. Everything runs on the CPU with one thread, in a temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from posttrain import skills
from posttrain.artifacts import Artifact
from posttrain.config import TinyModelConfig
from posttrain.jsonl import write_jsonl
from posttrain.models import build_tiny, save_pretrained

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("base")
    model, tokenizer = build_tiny(TinyModelConfig(), seed=0)
    save_pretrained(model, tokenizer, folder)
    return Artifact(folder, {"digest": "tiny-base", "metrics": {}})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("data")
    for role, rows in (("instruction", 600), ("preference", 300), ("prompt", 60)):
        records, _ = skills.generate_rows(role, rows=rows, seed=1)
        cut = len(records) // 10
        write_jsonl(folder / role / "eval.jsonl", records[:cut])
        write_jsonl(folder / role / "train.jsonl", records[cut:])
    return Artifact(folder, {"digest": "tiny-data", "metrics": {}})


@pytest.fixture(scope="session")
def tiny_benchmarks(tmp_path_factory) -> Artifact:
    """The six demo skill tasks, 5 scored + 3 calibration items each, as the benchmarks stage writes them."""
    import json

    from posttrain.benchmarks import load_task, task_items

    folder = tmp_path_factory.mktemp("benchmarks")
    specs = {}
    for name in ("copy", "reverse", "sort", "upper", "max", "add"):
        task = load_task(name)
        write_jsonl(folder / f"{name}.jsonl", task_items(task, calibration=3, items=5))
        specs[name] = task.model_dump(mode="json", exclude={"file"})
    (folder / "tasks.json").write_text(json.dumps(specs))
    return Artifact(folder, {"digest": "tiny-benchmarks", "metrics": {}})


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1, shared by the CLI runs of a test session: each run
    then skips starting Prefect's temporary server (about 5 s a run). Pass it as PREFECT_API_URL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-server")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"],
        env=env, stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        from tests.kill_harness import stop_group

        stop_group(server, 20)
