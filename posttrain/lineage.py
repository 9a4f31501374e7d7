"""Where a model came from, read from the store's manifests: sources → data → training stages → model.

    chain = lineage(root, "store/sft/1c1d1b74072eb56d36c9")   # or resolve(root, "champion" | "v3" | RUN)
    print(render(chain))

Each artifact's manifest names its inputs (by digest and store path), its config section, what it
read from outside the store (source files and model folders by sha256, hub ids by commit), the code
commit it was built from, and the run that built it; following the inputs from the model back to
the sources gives the whole chain, in build order. MLflow runs are found by the tags every stage run
carries (`posttrain.stage`, `posttrain.fingerprint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.artifacts import MANIFEST

DATA_COUNTS = ("rows_in", "rows_out")


class LineageError(ValueError):
    """The target cannot be resolved; the message is one line."""


@dataclass
class Link:
    stage: str
    path: str  # relative to the store root
    manifest: dict
    mlflow_run: str | None = None


def lineage(root: Path, path: str) -> list[Link]:
    """The artifact at `path` and everything it was built from, sources first."""
    root = Path(root)
    order: list[Link] = []
    seen: set[str] = set()

    def visit(relative: str) -> None:
        if relative in seen:
            return
        seen.add(relative)
        manifest_path = root / relative / MANIFEST
        if not manifest_path.is_file():
            raise LineageError(f"{root / relative}: no published artifact here (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        for _, info in sorted(manifest.get("inputs", {}).items()):
            if info.get("path"):
                visit(info["path"])
        order.append(Link(manifest.get("stage", Path(relative).parent.name), relative, manifest))

    visit(path)
    return order


def resolve(root: Path, target: str, tracking_uri: str | None = None, registered_model: str | None = None) -> str:
    """A store path from what a user has at hand: a store folder, a run (its candidate, else its last
    stage), or a registered model version (`champion`, `v3`, `3`, `name/3`, `name@champion`)."""
    root = Path(root).resolve()
    folder = Path(target)
    for candidate in (folder, root / target):
        if (candidate / MANIFEST).is_file():
            return candidate.resolve().relative_to(root).as_posix()
    from posttrain.runs import find_run

    record = find_run(root, target)
    if record is not None:
        stages = record.get("stages", {})
        chosen = {"student": "distill"}.get(record.get("candidate"), record.get("candidate"))
        if chosen in stages and stages[chosen].get("path"):
            return stages[chosen]["path"]
        built = [info["path"] for info in stages.values() if info.get("path")]
        if not built:
            raise LineageError(f"run {record['run_id']}: no stage of it was published")
        return built[-1]
    return _registered_path(root, target, tracking_uri, registered_model)


def _registered_path(root: Path, target: str, tracking_uri: str | None, registered_model: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    from posttrain.tracking import CHAMPION, TAG

    name, _, version = target.rpartition("/") if "/" in target else target.rpartition("@")
    name = name or registered_model
    version = version.removeprefix("v")
    if name is None:
        raise LineageError(f"{target}: not a store folder or a run under {root}, and no registered model name to look a version up in")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{root / 'mlflow.db'}")
    try:
        found = client.get_model_version_by_alias(name, version) if not version.isdigit() else client.get_model_version(name, version)
    except MlflowException:
        alias = f" (an alias such as {CHAMPION})" if not version.isdigit() else ""
        raise LineageError(f"{target}: not a store folder, a run, or a version of registered model {name}{alias}") from None
    path = found.tags.get(f"{TAG}store_path")
    if not path:
        raise LineageError(f"{name} v{found.version}: the version names no store folder")
    return path


def attach_mlflow_runs(chain: list[Link], tracking_uri: str, experiment: str) -> str | None:
    """The MLflow run that logged each artifact: the one that built it, else the one that back-filled
    it. Returns the experiment's id (None when tracking has no such experiment)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from posttrain.tracking import TAG

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except MlflowException:
        return None
    if found is None:
        return None
    for link in chain:
        fingerprint = link.manifest.get("fingerprint")
        for marker in (f"tags.`{TAG}cache_hit` = 'false'", f"tags.`{TAG}backfilled` = 'true'"):
            runs = client.search_runs(
                [found.experiment_id], f"tags.`{TAG}stage` = '{link.stage}' and tags.`{TAG}fingerprint` = '{fingerprint}' and {marker}", max_results=1
            )
            if runs:
                link.mlflow_run = runs[0].info.run_id
                break
    return found.experiment_id


def _config_lines(config: dict) -> list[str]:
    import textwrap

    text = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(config.items()) if value not in (None, [], {}))
    return textwrap.wrap(text, 100, initial_indent="   config: ", subsequent_indent="           ")


def render(chain: list[Link], mlflow_link=None) -> str:
    """The chain as text, one block per artifact, sources and counts where the stage has them."""
    lines = []
    for number, link in enumerate(chain, 1):
        manifest = link.manifest
        git = manifest.get("git", {})
        commit = git.get("commit", "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        lines.append(f"{number}. {link.stage}  {link.path}  digest {manifest.get('digest', '?')[:16]}")
        lines.append(f"   built by run {manifest.get('built_by', {}).get('run_id')} at {manifest.get('created_at')}, code {commit}, fingerprint {manifest.get('fingerprint')}")
        outside = dict(manifest.get("outside", {}))
        for index, source in enumerate(manifest.get("sources", [])):
            digest = outside.pop(f"data.sources[{index}]", "generated by the run")
            lines.append(f"   source {source.get('source')} ({source.get('format')}, role {source.get('role')}, {source.get('rows')} rows): {digest}")
        for name, digest in sorted(outside.items()):
            lines.append(f"   outside input {name}: {digest}")
        if link.stage == "base" and manifest.get("origin"):
            lines.append(f"   model: {manifest['origin']}")
        metrics = manifest.get("metrics", {})
        if link.stage == "data":
            removed = {key.removeprefix("removed_"): value for key, value in sorted(metrics.items()) if key.startswith("removed_") and value}
            counts = ", ".join(f"{key} {metrics[key]}" for key in DATA_COUNTS if key in metrics)
            lines.append(f"   rows: {counts}; removed by rule: {', '.join(f'{rule} {count}' for rule, count in removed.items()) or 'none'}")
        if manifest.get("config"):
            lines.extend(_config_lines(manifest["config"]))
        if link.mlflow_run:
            lines.append(f"   MLflow: {mlflow_link(link.mlflow_run) if mlflow_link else link.mlflow_run}")
    return "\n".join(lines)
