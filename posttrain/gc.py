"""`posttrain gc`: free what nothing refers to, keep what a run, a registered model or a resume needs.

    plan = collect(root, keep_runs=5, registered=registered_paths(root))
    plan.removals        # [Removal(path, bytes, why)], biggest first; apply(plan) deletes them

Kept: every store folder a kept run used (the newest `keep_runs` finished runs, and every run still
running), every folder a registered model version names (`posttrain.store_path`: the `champion`
among them), and everything those folders were built from (their manifests' inputs, transitively),
so lineage and `resume` never point at a deleted folder. Checkpoints of a stage that failed in a
kept run are kept for `posttrain resume`.

Removed: other published folders; staging folders (`.tmp-*`) and checkpoints whose build lock is
free (a build in progress holds it, so nothing in use is touched); folders set aside by a forced
rebuild (`replaced/`) or found without a manifest (`*.orphan-*`). Run records and logs stay: they
are small, and a record whose folders are gone still says what ran.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.artifacts import MANIFEST, Store
from posttrain.runs import is_dead, list_runs


@dataclass(frozen=True)
class Removal:
    path: Path
    bytes: int
    why: str
    lock: tuple[str, str] | None = None  # (stage, fingerprint) whose build lock must be free to remove it


@dataclass
class GcPlan:
    root: Path
    kept: dict[str, str] = field(default_factory=dict)  # store path -> why it is kept
    removals: list[Removal] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(removal.bytes for removal in self.removals)


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file() and not child.is_symlink())


def registered_paths(root: Path, tracking_uri: str | None = None, registered_model: str | None = None) -> dict[str, str]:
    """Store paths named by registered model versions: {path: "registered <model> v<N>[ champion]"}."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from posttrain.tracking import TAG

    db = Path(root) / "mlflow.db"
    if tracking_uri is None and not db.is_file():
        return {}
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{db}")
    found = {}
    try:
        names = [registered_model] if registered_model else [model.name for model in client.search_registered_models()]
        for name in names:
            for version in client.search_model_versions(f"name = '{name}'"):
                path = version.tags.get(f"{TAG}store_path")
                if path:
                    aliases = " " + ", ".join(version.aliases) if version.aliases else ""
                    found[path] = f"registered {name} v{version.version}{aliases}"
    except MlflowException:
        return found
    return found


def _with_inputs(root: Path, kept: dict[str, str]) -> dict[str, str]:
    """`kept` and, transitively, every folder their manifests name as an input."""
    pending = list(kept)
    while pending:
        path = pending.pop()
        manifest = root / path / MANIFEST
        if not manifest.is_file():
            continue
        for name, info in json.loads(manifest.read_text()).get("inputs", {}).items():
            source = info.get("path")
            if source and source not in kept:
                kept[source] = f"input {name} of {path}"
                pending.append(source)
    return kept


def collect(root: Path, keep_runs: int, registered: dict[str, str]) -> GcPlan:
    root = Path(root).resolve()
    store = Store(root)
    runs = list_runs(root)
    alive = [record for record in runs if record.get("status") == "running" and not is_dead(record)]
    finished = [record for record in runs if record not in alive]
    kept_runs = alive + finished[-keep_runs:] if keep_runs > 0 else alive
    kept: dict[str, str] = {}
    resumable: set[tuple[str, str]] = set()
    for record in kept_runs:
        for stage, info in record.get("stages", {}).items():
            if info.get("path"):
                kept.setdefault(info["path"], f"run {record['run_id']}")
            if info.get("state") in ("failed", "running") and info.get("fingerprint"):
                resumable.add((stage, info["fingerprint"]))
    for path, why in registered.items():
        kept.setdefault(path, why)
    plan = GcPlan(root, kept=_with_inputs(root, kept))

    for manifest in sorted((root / "store").glob(f"*/*/{MANIFEST}")):
        folder = manifest.parent
        relative = folder.relative_to(root).as_posix()
        if relative not in plan.kept:
            plan.removals.append(Removal(folder, folder_bytes(folder), "no kept run or registered version uses it"))
    for staging in sorted((root / "store").glob("*/.tmp-*")):
        stage, fingerprint = staging.parent.name, staging.name.removeprefix(".tmp-").rsplit("-", 1)[0]
        if _free(store, stage, fingerprint):
            plan.removals.append(Removal(staging, folder_bytes(staging), "staging folder of a build that ended", (stage, fingerprint)))
    for orphan in sorted((root / "store").glob("*/*.orphan-*")):
        plan.removals.append(Removal(orphan, folder_bytes(orphan), "set aside without a manifest"))
    for replaced in sorted((root / "replaced").glob("*/*")):
        plan.removals.append(Removal(replaced, folder_bytes(replaced), "replaced by a forced rebuild"))
    for checkpoints in sorted((root / "checkpoints").glob("*/*")):
        stage, fingerprint = checkpoints.parent.name, checkpoints.name
        if (stage, fingerprint) in resumable:
            continue
        if _free(store, stage, fingerprint):
            plan.removals.append(Removal(checkpoints, folder_bytes(checkpoints), "checkpoints no kept run can resume", (stage, fingerprint)))
    plan.removals.sort(key=lambda removal: -removal.bytes)
    return plan


def _free(store: Store, stage: str, fingerprint: str) -> bool:
    with store.build_lock(stage, fingerprint, wait=False) as free:
        return free


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def apply(plan: GcPlan) -> list[Removal]:
    """Delete the plan's removals; a staging or checkpoint folder only while holding its build lock
    (a build that started since the plan was made keeps its folders). Returns what was removed."""
    store, done = Store(plan.root), []
    for removal in plan.removals:
        if removal.lock is None:
            _remove(removal.path)
            done.append(removal)
            continue
        with store.build_lock(*removal.lock, wait=False) as free:
            if free:
                _remove(removal.path)
                done.append(removal)
    return done
