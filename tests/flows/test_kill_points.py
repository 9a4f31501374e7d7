"""kill -9 at each point where a crash costs work — mid data processing, mid training step, mid model
save, between a stage's publish and its MLflow logging, mid evaluation — then run again.

One store takes the kills one after another (each re-run is killed at the next point), then a last
run finishes. Checked after every kill: nothing the run started is alive, the record says failed,
the stage in flight has no published folder (a half-written one never counts), and the next run
reuses every stage finished before the kill. At the end: the final artifacts are byte for byte, and
the results value for value, those of an uninterrupted run with the same seed in another store.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from posttrain.artifacts import MANIFEST, Store
from tests.kill_harness import newest_record, run_cli, run_killed_at

# (failpoint, the stage in flight when it fires)
KILLS = [
    ("data:phase@3", "data"),
    ("sft:train-step@3", "sft"),
    ("sft:save", "sft"),
    ("reward:published", "reward"),
    ("evaluate-sft:generate@2", "evaluate-sft"),
]


def finished(record: dict) -> set[str]:
    return {name for name, info in record["stages"].items() if info.get("state") in ("built", "cached")}


def digests(root: Path, record: dict) -> dict[str, str]:
    return {name: json.loads((root / info["path"] / MANIFEST).read_text())["digest"] for name, info in record["stages"].items() if info.get("path")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the watchdog reads /proc (Linux)")
def test_kill_at_each_point_then_the_run_finishes_as_if_uninterrupted(tmp_path, prefect_api):
    clean_root, root = tmp_path / "uninterrupted", tmp_path / "killed"
    server = {"PREFECT_API_URL": prefect_api}  # a shared server: the runs skip starting their own
    clean = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={clean_root}"], env=server)
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = newest_record(clean_root)

    args = ["run", "configs/smoke.yaml", "--set", f"store_root={root}"]
    store = Store(root)
    done_before: set[str] = set()
    seen: list[dict] = []
    for failpoint, in_flight in KILLS:
        record = run_killed_at(failpoint, args, root, env=server)
        seen.append(record)
        assert record["stages"][in_flight]["state"] == "failed", (failpoint, record["stages"][in_flight])
        reused = {name for name, info in record["stages"].items() if info.get("state") == "cached"}
        assert done_before <= reused, f"{failpoint}: rebuilt after a kill: {sorted(done_before - reused)}"
        if in_flight == "reward":  # killed after publishing: the folder is complete and counts
            assert store.artifacts("reward")
        else:
            assert not store.artifacts(in_flight), f"{failpoint}: a half-built {in_flight} counts as published"
        if failpoint == "sft:save":  # the weights written, the tokenizer not: a half-written folder, not counted
            (staging,) = (root / "store" / "sft").glob(".tmp-*")
            assert (staging / "model.safetensors").is_file() and not (staging / "tokenizer.json").exists()
            assert not (staging / MANIFEST).exists()
        done_before = finished(record) | ({"reward"} if in_flight == "reward" else set())

    final = run_cli(args, env=server)
    assert final.returncode == 0, final.stderr[-3000:]
    record = newest_record(root)
    reused = {name for name, info in record["stages"].items() if info.get("state") == "cached"}
    assert done_before <= reused, sorted(done_before - reused)
    assert record["status"] == "succeeded"
    assert digests(root, record) == digests(clean_root, expected)
    assert record["results"] == expected["results"]
    assert not list((root / "store").glob("*/.tmp-*")), "a killed attempt's staging folder was left behind"

    # The reward model published before its logging was killed reached MLflow on the next run.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    reward_runs = client.search_runs(
        [client.get_experiment_by_name("posttrain").experiment_id], "tags.`posttrain.stage` = 'reward'"
    )
    assert any(run.data.tags.get("posttrain.backfilled") == "true" for run in reward_runs)
    # Each killed run reads as failed in MLflow too (closed by the run after it).
    assert all(client.get_run(killed["mlflow_parent_run_id"]).info.status == "FAILED" for killed in seen)
