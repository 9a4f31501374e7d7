"""Runs at the same time on one store: each stage built once (a twin waits for the lock and reuses
the artifact), no finished folder moved, one record and one log per run, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_same_and_one_different_config_at_once_build_each_stage_once(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "posttrain.cli", "run", "configs/smoke.yaml", "--set", f"store_root={root}", "--until", "sft"]
    commands = [base, base, [*base, "--set", "sft.lr=0.002"]]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stdout + stderr and "error" not in stderr.lower(), stderr[-3000:]

    records = [json.loads(path.read_text()) for path in sorted((root / "runs").glob("*/run.json"))]
    assert len(records) == 3 and len({record["run_id"] for record in records}) == 3
    assert len(list((root / "logs").glob("*.log"))) == 3
    for stage in ("base", "benchmarks", "data"):
        states = sorted(record["stages"][stage]["state"] for record in records)
        assert states == ["built", "cached", "cached"], (stage, states)
    same = [record for record in records if "sft.lr=0.002" not in record["overrides"]]
    [different] = [record for record in records if "sft.lr=0.002" in record["overrides"]]
    assert sorted(record["stages"]["sft"]["state"] for record in same) == ["built", "cached"]
    assert different["stages"]["sft"]["state"] == "built"
    assert same[0]["stages"]["sft"]["path"] == same[1]["stages"]["sft"]["path"]
    assert not list((root / "store").glob("*/*.orphan-*"))  # nothing moved aside
    assert len(list((root / "store" / "sft").glob("*/manifest.json"))) == 2
