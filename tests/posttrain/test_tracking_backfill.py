"""A run killed between publishing a stage and logging it to MLflow: the artifact is in the store
but no finished MLflow run holds it. The next run's cache hit back-fills it, and later hits point
at that run instead of logging it again."""

from __future__ import annotations

import json

from posttrain.artifacts import Artifact, Store
from posttrain.config import SftConfig, TrackingConfig
from posttrain.runner import StageOutcome
from posttrain.tracking import TAG, PipelineTracking


def test_a_hit_whose_builder_never_logged_backfills_it_once(tmp_path):
    root = tmp_path / "root"
    store = Store(root)
    staging = store.staging_dir("sft", "f" * 20)
    (staging / "weights.txt").write_text("the model")
    artifact = store.publish("sft", "f" * 20, Artifact.draft(staging, {"eval_loss": 0.5}), {})  # published, never logged

    def hit(run_id: str) -> str:
        with PipelineTracking(TrackingConfig(), root, run_id, "backfill", "seed: 0\n", {"seed": 0}) as tracking:
            return tracking.log_stage("sft", StageOutcome(artifact, True, 0.0), SftConfig(), {}, log_model=True)

    first, second = hit("run-1"), hit("run-2")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    first_run, second_run = client.get_run(first), client.get_run(second)
    assert first_run.data.tags[f"{TAG}backfilled"] == "true" and first_run.info.status == "FINISHED"
    assert "model" in [item.path for item in client.list_artifacts(first)]  # the upload the builder never made
    assert second_run.data.tags[f"{TAG}built_by_run"] == first and f"{TAG}backfilled" not in second_run.data.tags
    assert "model" not in [item.path for item in client.list_artifacts(second)]
    assert json.loads((artifact.path / "manifest.json").read_text())["metrics"] == {"eval_loss": 0.5}
