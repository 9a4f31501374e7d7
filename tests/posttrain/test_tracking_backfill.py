"""A run killed between publishing a stage and logging it to MLflow: the artifact is in the store
but no finished MLflow run holds it. The next run's cache hit back-fills it, and later hits point
at that run instead of logging it again."""

from __future__ import annotations

import json

from posttrain.artifacts import Artifact, Store
from posttrain.config import SftConfig, TrackingConfig
from posttrain.runner import StageOutcome
from posttrain.tracking import TAG, PipelineTracking


def published_sft(root, fingerprint: str) -> Artifact:
    """An sft artifact in the store at `root`, published and never logged."""
    store = Store(root)
    staging = store.staging_dir("sft", fingerprint)
    (staging / "weights.txt").write_text("the model")
    return store.publish("sft", fingerprint, Artifact.draft(staging, {"eval_loss": 0.5}), {})


def test_a_hit_whose_builder_never_logged_backfills_it_once(tmp_path):
    root = tmp_path / "root"
    artifact = published_sft(root, "f" * 20)  # published, never logged

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


def test_a_hit_finds_its_builder_in_the_store_index_without_a_search_and_another_database_does_not(tmp_path, monkeypatch):
    # An unchanged re-run against a tracking server pays ~55 ms a request: the store remembers which
    # run logged each stage, keyed by the tracking URI and the experiment with its creation time.
    import mlflow

    root = tmp_path / "root"
    artifact = published_sft(root, "e" * 20)

    def log(run_id: str, cache_hit: bool) -> str:
        with PipelineTracking(TrackingConfig(), root, run_id, "index", "seed: 0\n", {"seed": 0}) as tracking:
            return tracking.log_stage("sft", StageOutcome(artifact, cache_hit, 0.0), SftConfig(), {})

    builder = log("run-1", cache_hit=False)
    index = json.loads((root / "cache" / "mlflow-builders.json").read_text())
    assert [entries for entries in index.values()] == [{f"sft/{'e' * 20}": builder}]

    searches = []
    real_search = mlflow.search_runs
    monkeypatch.setattr(mlflow, "search_runs", lambda *args, **kwargs: searches.append(kwargs) or real_search(*args, **kwargs))
    hit = log("run-2", cache_hit=True)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(hit).data.tags[f"{TAG}built_by_run"] == builder
    assert not [call for call in searches if "fingerprint" in call.get("filter_string", "")]  # found in the index

    # Another tracking database (another server, or the store's own database for a store that was
    # logged elsewhere): the index entry does not apply; the hit finds no builder and back-fills.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with PipelineTracking(TrackingConfig(uri=other), root, "run-3", "index", "seed: 0\n", {"seed": 0}) as tracking:
        backfill = tracking.log_stage("sft", StageOutcome(artifact, True, 0.0), SftConfig(), {})
    assert mlflow.MlflowClient(tracking_uri=other).get_run(backfill).data.tags[f"{TAG}backfilled"] == "true"


def test_two_runs_creating_the_registered_model_at_once_both_go_on(tmp_path, monkeypatch):
    # Both found the registered model missing; the other created it first: ours must not fail
    # (CI saw "Registered Model (name=smoke) already exists" from three runs started together).
    import mlflow
    from mlflow.exceptions import MlflowException

    root = tmp_path / "root"
    artifact = published_sft(root, "d" * 20)
    with PipelineTracking(TrackingConfig(), root, "run-1", "race", "seed: 0\n", {"seed": 0}) as tracking:
        mlflow.MlflowClient().create_registered_model(tracking.registered_model)  # the twin's, just now

        def not_yet(self, name):
            raise MlflowException(f"Registered Model with name={name} not found", error_code="RESOURCE_DOES_NOT_EXIST")

        monkeypatch.setattr(mlflow.MlflowClient, "get_registered_model", not_yet)
        tracking.log_stage("sft", StageOutcome(artifact, False, 0.0), SftConfig(), {}, model="sft")
        assert str(tracking.model_versions["sft"]) == "1"
