"""Run one stage with the store as its cache: look up the fingerprint, else build and publish.

    outcome = execute_stage("sft", "tasks.sft", cfg.sft, {"base": base, "data": data}, store, seed=0)
    outcome.artifact.path, outcome.cache_hit

This is the whole caching contract, with no Prefect or MLflow in it, so the CLI, the flow and the
tests share one definition of "a cache hit": the stored manifest exists for this fingerprint and
the folder still matches it (posttrain.artifacts.check_files). The stage module is imported only
when it has to run, so a run that is all cache hits never loads torch or a trainer.

A stage runs either in this process or as `python -m tasks.<stage>` (optionally behind a launcher
such as `accelerate launch`); either way it writes into a staging folder that is published only
after it returns, so a crash never leaves a folder that looks finished. A failed stage's staging
folder is left in place (`store/<stage>/.tmp-*`) so its diagnostics can be read.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from posttrain.artifacts import Artifact, Store
from posttrain.config import LauncherConfig
from posttrain.fingerprint import StageKey, module_source, stage_key
from posttrain.outside import DigestMemo

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


def _run_subprocess(module_name: str, section, inputs: dict[str, Artifact], staging: Path, prefix: list[str], environment: dict) -> Artifact:
    config_file = staging.parent / f"{staging.name}.config.json"
    inputs_file = staging.parent / f"{staging.name}.inputs.json"
    config_file.write_text(json.dumps(section.model_dump(mode="json")))
    inputs_file.write_text(json.dumps({name: {"path": str(a.path), "manifest": a.manifest} for name, a in inputs.items()}, default=str))
    command = [*prefix, "-m", module_name, "--config", str(config_file), "--inputs", str(inputs_file), "--out", str(staging)]
    if command[0] == "python":
        command[0] = sys.executable
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **environment})
    finally:
        config_file.unlink(missing_ok=True)
        inputs_file.unlink(missing_ok=True)
    if completed.returncode != 0:
        raise StageError(f"{module_name}: subprocess exited with status {completed.returncode}")
    draft_path = staging / DRAFT_FILE
    draft = json.loads(draft_path.read_text())
    draft_path.unlink()
    return Artifact(staging, draft)


_DISK_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded")


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` or anything in its chain is a full disk: an OSError with ENOSPC or EDQUOT, or a
    library's wrapped form of it (safetensors' writer, in Rust, raises its own error naming
    `StorageFull`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(exc) for marker in _DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_after(staging: Path) -> bool:
    """A subprocess stage's full disk shows only as its exit status: look at the disk itself."""
    try:
        return shutil.disk_usage(staging if staging.exists() else staging.parent).free < 1 << 20
    except OSError:
        return False


def _disk_full_error(stage: str, staging: Path) -> StageError:
    """One line for a full disk; the half-written staging folder is removed, since keeping it for
    diagnosis would keep the disk full, and it never counted as an artifact anyway."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        free_bytes = shutil.disk_usage(staging.parent).free
        free = f"{free_bytes / 1e9:.1f} GB" if free_bytes >= 1e9 else f"{free_bytes / 1e6:.2f} MB"
        free += " free after removing it"
    except OSError:
        free = "free space unknown"
    return StageError(
        f"{stage}: no space left on device while writing {staging.parent} ({free}); "
        f"the partial folder was removed, published stages are unchanged: free space and run again"
    )


DISTRIBUTED_STAGES = ("sft",)  # the stages whose global batch stays the same over any number of processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(stage: str, launcher: LauncherConfig | None) -> list[str] | None:
    """The command prefix a stage runs under, or None to run it in this process.

    `auto` (the default) runs in this process unless several CUDA devices are visible and the stage
    trains with DDP; then, like `distributed`, one process per device: `accelerate launch
    --multi_gpu` on GPUs, or `python -m torch.distributed.run` (gloo, on 127.0.0.1) on CPUs, where
    accelerate would need mpirun. The world size never changes what is trained (the global batch is
    fixed, tasks/sft.py training_schedule), so none of this is in the cache key."""
    if launcher is None or launcher.kind == "inprocess":
        return None
    if launcher.kind == "subprocess":
        return list(launcher.command)
    if launcher.kind == "deployment":
        raise StageError(f"{stage}: launcher kind deployment runs through the pipeline's flow (flows/stage_flow.py), not here")
    import torch

    gpus = torch.cuda.device_count()
    if launcher.kind == "auto" and (gpus < 2 or stage not in DISTRIBUTED_STAGES):
        return None
    if stage not in DISTRIBUTED_STAGES:
        raise StageError(f"{stage}.launcher.kind: distributed is supported for {', '.join(DISTRIBUTED_STAGES)} only; {stage} trains in one process")
    processes = launcher.processes or gpus
    if processes < 2:
        raise StageError(f"{stage}.launcher: distributed needs launcher.processes >= 2 or several visible CUDA devices (found {gpus})")
    if gpus >= 2:
        accelerate = Path(sys.executable).parent / "accelerate"
        return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]


def compute_key(stage: str, module: str | ModuleType, section, inputs: dict[str, Artifact], store: Store) -> StageKey:
    return stage_key(stage, module, section, inputs, DigestMemo(store.digest_memo_path))


def execute_stage(
    stage: str,
    module: str | ModuleType,
    section,
    inputs: dict[str, Artifact],
    store: Store,
    seed: int,
    launcher: LauncherConfig | None = None,
    threads: int = 1,
    device: str = "auto",
    run_id: str | None = None,
    key: StageKey | None = None,
    force: bool = False,
) -> StageOutcome:
    """`module` is a module name ("tasks.sft") or a module; `key` when the caller computed it.
    `force` (`posttrain rerun --from`): build even when the store has it, and publish the new
    build in its place (Store.publish `replace`)."""
    key = key or compute_key(stage, module, section, inputs, store)
    cached = None if force else store.lookup(stage, key.fingerprint)
    if cached is not None:
        return StageOutcome(cached, True, 0.0)
    with store.build_lock(stage, key.fingerprint):
        # A twin run on this store may have built it while this one waited for the lock.
        cached = None if force else store.lookup(stage, key.fingerprint)
        if cached is not None:
            return StageOutcome(cached, True, 0.0)
        return _build(stage, module, section, inputs, store, seed, launcher, threads, device, run_id, key, force)


def _build(stage, module, section, inputs, store, seed, launcher, threads, device, run_id, key, force=False) -> StageOutcome:
    module_name, _ = module_source(module)
    staging = store.staging_dir(stage, key.fingerprint)
    started = time.perf_counter()
    # Where models go and how many threads torch uses: read by posttrain.models.pick_device and
    # set in this process too, so an in-process stage sees the same settings as a subprocess one.
    # POSTTRAIN_STAGE names the stage being built, for posttrain.failpoints; the checkpoint folder is
    # keyed by the fingerprint, so only the same work resumes from it (posttrain.training.checkpointing).
    checkpoints = store.checkpoint_dir(stage, key.fingerprint)
    environment = {"POSTTRAIN_THREADS": str(threads), "POSTTRAIN_DEVICE": device, "POSTTRAIN_STAGE": stage, "POSTTRAIN_CHECKPOINT_DIR": str(checkpoints)}
    os.environ.update(environment)
    # The staging folder stays after a failure for diagnosis (contract results, rejected rows, partial
    # logs); without a manifest and under a .tmp- name it never counts as an artifact.
    try:
        command = launch_command(stage, launcher)
        if command is not None:
            draft = _run_subprocess(module_name, section, inputs, staging, command, environment)
        else:
            from posttrain.training import set_threads

            set_threads(threads)
            loaded = importlib.import_module(module) if isinstance(module, str) else module
            draft = loaded.run(section, inputs, staging)
    except Exception as exc:
        if disk_full(exc) or disk_full_after(staging):
            raise _disk_full_error(stage, staging) from exc
        raise
    finally:  # a stage called later in this process, directly, must not write into this one's folder
        os.environ.pop("POSTTRAIN_CHECKPOINT_DIR", None)
        os.environ.pop("POSTTRAIN_STAGE", None)
    seconds = time.perf_counter() - started
    # The key carries the versions of the process that planned the run; a stage built on a worker
    # (launcher kind deployment) records its own, and says so when they differ (a CUDA build of
    # torch on a GPU worker is expected to: the bytes then come from that build).
    from posttrain.closure import environment_versions

    built_versions = environment_versions([name for name in key.parts["versions"] if name != "python"])
    differing = {name: {"key": key.parts["versions"].get(name), "built_with": version} for name, version in built_versions.items() if key.parts["versions"].get(name) != version}
    if differing:
        print(f"{stage}: built with other library versions than the run's key: " + ", ".join(f"{name} {both['built_with']} (key: {both['key']})" for name, both in differing.items()), file=sys.stderr)
    manifest_fields = {
        "config": key.parts["config"],
        "inputs": {
            name: {"digest": artifact.digest, "path": artifact.manifest.get("path", str(artifact.path))}
            for name, artifact in sorted(inputs.items())
        },
        "outside": key.parts["outside"],
        "code": key.parts["code"],
        "versions": key.parts["versions"],
        "seed": seed,
        "git": git_state(),
        "built_by": {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "versions": built_versions, **({"versions_differ": differing} if differing else {}),
        },
        "seconds": round(seconds, 2),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        artifact = store.publish(stage, key.fingerprint, draft, manifest_fields, replace=force)
    except OSError as exc:  # the manifest is written last: without it the folder never counts
        if disk_full(exc):
            raise _disk_full_error(stage, staging) from exc
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)  # published: nothing will resume from them
    return StageOutcome(artifact, False, seconds)
