"""Run one stage with the store as its cache: look up the fingerprint, else build and publish.

    outcome = execute_stage("sft", tasks.sft, cfg.sft, {"base": base, "data": data}, store, seed=0)
    outcome.artifact.path, outcome.cache_hit

This is the whole caching contract, with no Prefect or MLflow in it, so the CLI, the flow and the
tests share one definition of "a cache hit": the stored manifest exists for this fingerprint. A
stage runs either in this process or as `python -m tasks.<stage>` (optionally behind a launcher
such as `accelerate launch`); either way it writes into a staging folder that is published only
after it returns, so a crash never leaves a folder that looks finished. A failed stage's staging
folder is left in place (`store/<stage>/.tmp-*`) so its diagnostics can be read.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from posttrain.artifacts import Artifact, Store
from posttrain.config import LauncherConfig
from posttrain.fingerprint import fingerprint, library_versions, section_payload

DRAFT_FILE = "_draft.json"  # how a subprocess stage hands its draft manifest back
REPO_ROOT = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A stage failed; the message is one line naming the stage and the cause."""


@dataclass(frozen=True)
class StageOutcome:
    artifact: Artifact
    cache_hit: bool
    seconds: float


@functools.cache
def git_state() -> dict:
    """Commit and dirty flag of the code that produced an artifact (unknown outside a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _run_subprocess(
    module: ModuleType, section, inputs: dict[str, Artifact], staging: Path, launcher: LauncherConfig, threads: int
) -> Artifact:
    config_file = staging.parent / f"{staging.name}.config.json"
    inputs_file = staging.parent / f"{staging.name}.inputs.json"
    config_file.write_text(json.dumps(section.model_dump(mode="json")))
    inputs_file.write_text(json.dumps({name: {"path": str(a.path), "manifest": a.manifest} for name, a in inputs.items()}, default=str))
    command = [*launcher.command, "-m", module.__name__, "--config", str(config_file), "--inputs", str(inputs_file), "--out", str(staging)]
    if command[0] == "python":
        command[0] = sys.executable
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "POSTTRAIN_THREADS": str(threads)})
    finally:
        config_file.unlink(missing_ok=True)
        inputs_file.unlink(missing_ok=True)
    if completed.returncode != 0:
        raise StageError(f"{module.__name__}: subprocess exited with status {completed.returncode}")
    draft_path = staging / DRAFT_FILE
    draft = json.loads(draft_path.read_text())
    draft_path.unlink()
    return Artifact(staging, draft)


def execute_stage(
    stage: str,
    module: ModuleType,
    section,
    inputs: dict[str, Artifact],
    store: Store,
    seed: int,
    launcher: LauncherConfig | None = None,
    threads: int = 1,
    extra_source_files: tuple[Path, ...] = (),
) -> StageOutcome:
    key = fingerprint(stage, module, section, inputs, seed, extra_source_files)
    cached = store.lookup(stage, key)
    if cached is not None:
        return StageOutcome(cached, True, 0.0)

    staging = store.staging_dir(stage, key)
    started = time.perf_counter()
    try:
        if launcher is not None and launcher.kind == "subprocess":
            draft = _run_subprocess(module, section, inputs, staging, launcher, threads)
        else:
            from posttrain.training import set_threads

            set_threads(threads)
            draft = module.run(section, inputs, staging)
    except BaseException:
        # The staging folder stays for diagnosis (contract results, rejected rows, partial logs);
        # without a manifest and under a .tmp- name it never counts as an artifact.
        raise
    seconds = time.perf_counter() - started
    manifest_fields = {
        "config": section_payload(section),
        "inputs": {
            name: {"digest": artifact.digest, "path": artifact.manifest.get("path", str(artifact.path))}
            for name, artifact in sorted(inputs.items())
        },
        "seed": seed,
        "git": git_state(),
        "versions": {"python": platform.python_version(), **library_versions()},
        "seconds": round(seconds, 2),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    artifact = store.publish(stage, key, draft, manifest_fields)
    return StageOutcome(artifact, False, seconds)
