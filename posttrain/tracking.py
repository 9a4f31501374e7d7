"""MLflow: one parent run per pipeline run, one nested child run per stage.

    with PipelineTracking(cfg.tracking, store_root, run_name, config_yaml) as tracking:
        child_id = tracking.log_stage("sft", outcome, cfg.sft, upstream={"base": id0, "data": id1})

A child run holds the stage's config section as params, its manifest metrics (one batched call:
single `log_metric` calls cost ~10 ms each on SQLite), the datasets it read (`log_input`), the
manifest and the output model as artifacts, and tags linking it to the runs that produced its
inputs. A cached stage still gets a child run, tagged `posttrain.cache_hit=true` and pointing at
the run that built the artifact, so lineage stays complete in every run. MLflow is imported
lazily: it costs ~3 s, and a stage never needs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.config import TrackingConfig
from posttrain.fingerprint import section_payload
from posttrain.runner import StageOutcome, git_state

TAG = "posttrain."


def default_tracking_uri(store_root: Path) -> str:
    # An absolute SQLite path needs four slashes: sqlite:////abs/path.db (FIELD_NOTES).
    return f"sqlite:///{Path(store_root).resolve() / 'mlflow.db'}"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return out


class PipelineTracking:
    def __init__(self, config: TrackingConfig, store_root: Path, run_name: str, config_yaml: str, pipeline_params: dict):
        self.config = config
        self.store_root = Path(store_root)
        self.run_name = run_name
        self.config_yaml = config_yaml
        self.pipeline_params = pipeline_params
        self.parent_run_id: str | None = None
        self.child_runs: dict[str, str] = {}

    # ------------------------------------------------------------------ parent run
    def __enter__(self) -> "PipelineTracking":
        if not self.config.enabled:
            return self
        import mlflow

        mlflow.set_tracking_uri(self.config.uri or default_tracking_uri(self.store_root))
        experiment = mlflow.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            # Artifacts next to the database, not in ./mlruns of whatever folder the user ran from.
            location = (self.store_root.resolve() / "mlartifacts").as_uri()
            mlflow.create_experiment(self.config.experiment, artifact_location=location)
        mlflow.set_experiment(self.config.experiment)
        git = git_state()
        run = mlflow.start_run(
            run_name=self.run_name,
            tags={f"{TAG}kind": "pipeline", f"{TAG}git_commit": git["commit"], f"{TAG}git_dirty": str(git["dirty"]), "mlflow.source.git.commit": git["commit"]},
        )
        self.parent_run_id = run.info.run_id
        mlflow.log_params(self.pipeline_params)
        mlflow.log_text(self.config_yaml, "config.yaml")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.config.enabled:
            return
        import mlflow

        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------ children
    def _builder_run(self, stage: str, fingerprint: str) -> str | None:
        import mlflow

        found = mlflow.search_runs(
            filter_string=f"tags.`{TAG}fingerprint` = '{fingerprint}' and tags.`{TAG}cache_hit` = 'false' and tags.`{TAG}stage` = '{stage}'",
            search_all_experiments=True,
            max_results=1,
            output_format="list",
        )
        return found[0].info.run_id if found else None

    def log_stage(
        self,
        stage: str,
        outcome: StageOutcome,
        section,
        upstream: dict[str, str | None],
        datasets: list[tuple[str, Path, str]] = (),
        log_model: bool = False,
    ) -> str | None:
        """Create the stage's child run; returns its id (None when tracking is off)."""
        if not self.config.enabled:
            return None
        import mlflow
        from mlflow.entities import Metric

        artifact = outcome.artifact
        tags = {
            f"{TAG}stage": stage,
            f"{TAG}fingerprint": artifact.fingerprint,
            f"{TAG}digest": artifact.digest,
            f"{TAG}cache_hit": str(outcome.cache_hit).lower(),
            f"{TAG}artifact_path": str(artifact.path),
            f"{TAG}git_commit": artifact.manifest.get("git", {}).get("commit", "unknown"),
            "mlflow.source.git.commit": artifact.manifest.get("git", {}).get("commit", "unknown"),
        }
        for name, run_id in upstream.items():
            if run_id:
                tags[f"{TAG}upstream.{name}"] = run_id
        if outcome.cache_hit:
            builder = self._builder_run(stage, artifact.fingerprint)
            if builder:
                tags[f"{TAG}built_by_run"] = builder

        with mlflow.start_run(run_name=stage, nested=True, tags=tags) as child:
            client = mlflow.MlflowClient()
            params = _flatten("", section_payload(section), {})
            if params:
                mlflow.log_params({key[:250]: value[:6000] for key, value in params.items()})
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, float(value), now, 0)
                for key, value in artifact.metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
            metrics.append(Metric("cache_hit", float(outcome.cache_hit), now, 0))
            loss_file = artifact.path / "loss_history.json"
            if loss_file.is_file():
                metrics += [Metric("train_loss", p["loss"], now, p["step"]) for p in json.loads(loss_file.read_text())]
            for start in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics per call
                client.log_batch(child.info.run_id, metrics=metrics[start : start + 900])
            mlflow.log_artifact(str(artifact.path / "manifest.json"))
            for name, path, context in datasets:
                self._log_dataset(name, path, context)
            for extra in ("results.md", "results.json", "rejected.jsonl"):
                if (artifact.path / extra).is_file():
                    mlflow.log_artifact(str(artifact.path / extra))
            for folder in ("data_docs", "contracts"):  # GX Data Docs (HTML) and validation results
                if (artifact.path / folder).is_dir():
                    mlflow.log_artifacts(str(artifact.path / folder), artifact_path=folder)
            if log_model and self.config.log_models and not outcome.cache_hit:
                mlflow.log_artifacts(str(artifact.path), artifact_path="model")
        self.child_runs[stage] = child.info.run_id
        return child.info.run_id

    @staticmethod
    def _log_dataset(name: str, path: Path, context: str) -> None:
        import mlflow
        import pandas as pd

        frame = pd.read_json(path, lines=True)
        dataset = mlflow.data.from_pandas(frame, source=str(path), name=name)
        mlflow.log_input(dataset, context=context)
