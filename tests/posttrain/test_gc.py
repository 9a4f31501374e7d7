"""`posttrain gc` removes what no kept run, registered version or resume needs, and nothing in use."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from posttrain import gc
from posttrain.artifacts import Artifact, Store, write_json_atomic

REPO = Path(__file__).resolve().parents[2]


def publish(store: Store, stage: str, fingerprint: str, inputs: dict[str, Artifact] | None = None, size: int = 1000) -> Artifact:
    staging = store.staging_dir(stage, fingerprint)
    (staging / "weights.bin").write_bytes(os.urandom(size))
    fields = {"inputs": {name: {"digest": a.digest, "path": a.manifest["path"]} for name, a in (inputs or {}).items()}}
    return store.publish(stage, fingerprint, Artifact.draft(staging, {}), fields)


def record(root: Path, run_id: str, started: str, stages: dict[str, dict], status: str = "succeeded") -> None:
    write_json_atomic(
        root / "runs" / run_id / "run.json",
        {"run_id": run_id, "run_name": "t", "status": status, "started_at": started, "config": {}, "host": "elsewhere", "stages": stages},
    )


def test_gc_keeps_the_newest_runs_registered_models_their_inputs_and_what_is_in_use(tmp_path):
    store = Store(tmp_path)
    data = publish(store, "data", "d1")
    old_sft = publish(store, "sft", "s-old", {"data": data}, size=50_000)
    registered_sft = publish(store, "sft", "s-reg", {"data": publish(store, "data", "d-reg")})
    new_sft = publish(store, "sft", "s-new", {"data": data})
    built = lambda artifact: {"state": "built", "path": artifact.manifest["path"], "fingerprint": artifact.fingerprint}  # noqa: E731
    record(tmp_path, "old", "2026-01-01", {"data": built(data), "sft": built(old_sft)})
    record(tmp_path, "new", "2026-01-02", {"sft": built(new_sft)})  # its data folder only through sft's inputs
    record(tmp_path, "failed", "2026-01-03", {"reward": {"state": "failed", "fingerprint": "rfailed"}}, status="failed")

    # Leftovers: a dead build's staging folder, a build in progress, checkpoints of both kinds, a replaced folder.
    dead_staging = store.staging_dir("reward", "rdead")
    busy_staging = store.staging_dir("reward", "rbusy")
    for folder in ("rfailed", "rgone", "rbusy"):
        (tmp_path / "checkpoints" / "reward" / folder / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "replaced" / "sft" / "s-new-20260101").mkdir(parents=True)
    (tmp_path / "locks" / "reward").mkdir(parents=True, exist_ok=True)
    busy = (tmp_path / "locks" / "reward" / "rbusy.lock").open("a")
    fcntl.flock(busy, fcntl.LOCK_EX)  # another build holds it

    plan = gc.collect(tmp_path, keep_runs=2, registered={registered_sft.manifest["path"]: "registered t v1 champion"})
    removed = {removal.path.relative_to(tmp_path).as_posix(): removal.why for removal in plan.removals}
    assert removed == {
        "store/sft/s-old": "no kept run or registered version uses it",
        f"store/reward/{dead_staging.name}": "staging folder of a build that ended",
        "checkpoints/reward/rgone": "checkpoints no kept run can resume",
        "replaced/sft/s-new-20260101": "replaced by a forced rebuild",
    }
    assert plan.kept["store/data/d1"].startswith("input data of store/sft/s-new")
    assert plan.kept["store/data/d-reg"].startswith("input data of store/sft/s-reg")
    assert plan.bytes >= 50_000
    assert gc.apply(plan) and not old_sft.path.exists() and not dead_staging.exists()
    assert busy_staging.exists() and (tmp_path / "checkpoints" / "reward" / "rbusy").exists()
    assert (tmp_path / "checkpoints" / "reward" / "rfailed").exists()  # `posttrain resume failed` needs it
    assert all(artifact.path.exists() for artifact in (data, new_sft, registered_sft))

    # --keep-runs 1 keeps the newest run only: the failed one, whose checkpoints stay for `resume`.
    # Without an mlflow.db nothing is registered, so every published folder would go.
    fcntl.flock(busy, fcntl.LOCK_UN)
    dry = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "gc", "--root", str(tmp_path), "--keep-runs", "1", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert dry.returncode == 0, dry.stderr
    for path in ("store/sft/s-new", "store/sft/s-reg", "store/data/d1", "checkpoints/reward/rbusy"):
        assert path in dry.stdout, (path, dry.stdout)
    assert "checkpoints/reward/rfailed" not in dry.stdout and "0 published folders kept" in dry.stdout
    assert registered_sft.path.exists() and new_sft.path.exists()  # a dry run removes nothing
    assert json.loads((tmp_path / "runs" / "old" / "run.json").read_text())["run_id"] == "old"  # records stay
