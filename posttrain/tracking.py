"""MLflow: one parent run per pipeline run, one nested child run per stage.

    with PipelineTracking(cfg.tracking, store_root, run_id, run_name, config_text, params) as tracking:
        child_id = tracking.log_stage("sft", outcome, cfg.sft, upstream={"base": id0, "data": id1}, ...)

A child run holds the stage's config section as params, its manifest metrics (one batched call:
single `log_metric` calls cost ~10 ms each on SQLite), the datasets it read (`log_input`), the
manifest and the output model as artifacts, tags linking it to the runs that produced its inputs,
and the stage's real start and end times. A cached stage still gets a child run, tagged
`posttrain.cache_hit=true` and pointing at the run that built the artifact, so lineage stays
complete in every run. MLflow is imported lazily: it costs ~3 s, and a stage never needs it.

The default tracking store is `<store_root>/mlflow.db` with artifacts in `<store_root>/mlartifacts`.
MLflow keeps artifact locations as absolute URIs (it resolves relative ones when it creates an
experiment), so when the store has been moved or copied the database's locations are re-rooted
to where the store is now before anything is logged: a copy never writes into the original.
Tags, params and dataset sources name store folders relative to the store root.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from posttrain.artifacts import write_json_atomic
from posttrain.config import TrackingConfig
from posttrain.fingerprint import section_payload
from posttrain.runner import StageOutcome, git_state

TAG = "posttrain."
CHAMPION = "champion"
ARTIFACTS_FOLDER = "mlartifacts"
# MLflow 3's UI opens an experiment in its GenAI view (an empty "Traces" page) unless it carries this.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _log_inputs(client, run_id: str, inputs: list, attempts: int = 5) -> None:
    """log_inputs, tolerating a twin run on the same database: MLflow's SQL store looks a dataset
    up, then inserts it, so two runs logging the same dataset at once (both logging a stage one
    of them built) can collide on its unique key; the retry finds the other's row and links it."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as exc:  # MlflowException or SQLAlchemy's IntegrityError, by MLflow version
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in type(exc).__name__ or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")  # an MLflow dataset entity's


def _read_json(path: Path) -> dict:
    """A JSON cache file of the store as a dict; {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_tracking_uri(store_root: Path) -> str:
    # An absolute SQLite path needs four slashes: sqlite:////abs/path.db.
    return f"sqlite:///{Path(store_root).resolve() / 'mlflow.db'}"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return out


# Every column in which MLflow 3 stores an artifact location or a file source.
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("datasets", "dataset_source"),
)


def reroot_tracking_db(db_path: Path, store_root: Path, experiment: str) -> str | None:
    """Point the database's artifact locations at this store root if the store was moved or
    copied; returns the old root when something was rewritten."""
    if not db_path.is_file():
        return None
    root = Path(store_root).resolve()
    with sqlite3.connect(db_path) as connection:
        try:
            row = connection.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        except sqlite3.OperationalError:
            return None  # not yet an MLflow database
        if row is None or not row[0].startswith("file://"):
            return None
        location = row[0].removeprefix("file://")
        if not location.endswith(f"/{ARTIFACTS_FOLDER}"):
            return None  # a location the user chose: leave it
        old_root = location.removesuffix(f"/{ARTIFACTS_FOLDER}")
        if old_root == str(root):
            return None
        for table, column in _LOCATION_COLUMNS:
            try:
                connection.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?) WHERE {column} LIKE ?", (f"{old_root}/", f"{root}/", f"%{old_root}/%"))
            except sqlite3.OperationalError:
                continue  # an older schema without this table
    return old_root


def home_default_experiment(db_path: Path, store_root: Path) -> None:
    """MLflow creates a "Default" experiment whose artifacts go to ./mlruns of the folder it was
    started from; point it into the store root like ours."""
    root = Path(store_root).resolve()
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0 AND artifact_location NOT LIKE ?",
            ((root / ARTIFACTS_FOLDER / "0").as_uri(), f"%{root}/%"),
        )


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; said in one line."""


class PipelineTracking:
    def __init__(
        self, config: TrackingConfig, store_root: Path, run_id: str, run_name: str, config_text: str, pipeline_params: dict,
        resume_parent: str | None = None,
    ):
        """`resume_parent`: the MLflow parent run of a failed run that `posttrain resume` continues."""
        self.resume_parent = resume_parent
        self.config = config
        self.store_root = Path(store_root).resolve()
        self.run_id = run_id
        self.run_name = run_name
        self.config_text = config_text
        self.pipeline_params = pipeline_params
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.child_runs: dict[str, str] = {}
        self.model_versions: dict[str, str] = {}  # model name -> registered version, this run
        self._builders_key: str | None = None  # this server and experiment, in the builder index
        self._registered_model_exists = False
        self._cache_lock = threading.Lock()  # stages logged at once share the store's cache files
        # Stages in flight at once log concurrently to a tracking server; into the store's own
        # SQLite file one at a time (a second writer would wait on SQLite's lock, or fail).
        self._concurrent = (config.uri or "").startswith(("http://", "https://"))
        self._log_lock = nullcontext() if self._concurrent else threading.Lock()

    # ------------------------------------------------------------------ parent run
    def _first_contact(self, mlflow, uri: str):
        """The experiment, or one line if the server cannot be reached after MLflow's retries
        (MLFLOW_HTTP_REQUEST_MAX_RETRIES, posttrain.env): checked before any stage is built."""
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.get_experiment_by_name(self.config.experiment)
        except MlflowException as exc:
            if not uri.startswith(("http://", "https://")):
                raise
            reason = next((cause for cause in ("Connection refused", "Name or service not known", "timed out") if cause in str(exc)), str(exc).splitlines()[0][:120])
            tries = 1 + int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
            raise TrackingUnavailable(
                f"MLflow tracking server {uri}: unreachable after {tries} tries ({reason}); start it or set tracking.uri (tracking.enabled: false runs without MLflow)"
            ) from None

    def _close_runs_of_dead_processes(self, mlflow) -> None:
        """A run killed mid-way left its MLflow parent (and the child in flight) RUNNING forever;
        its record now says failed (posttrain.watchdog, posttrain.runs): say FAILED in MLflow too."""
        from mlflow.exceptions import MlflowException

        from posttrain.runs import RECORD, RunRecord

        client = mlflow.MlflowClient()
        for path in (self.store_root / "runs").glob(f"*/{RECORD}"):
            try:
                record = RunRecord.load(path)
            except (OSError, json.JSONDecodeError):
                continue
            parent = record.data.get("mlflow_parent_run_id")
            if record.data.get("status") != "failed" or not parent or record.data.get("mlflow_closed"):
                continue
            try:
                running = client.search_runs(
                    [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
                )
                for run_id in [run.info.run_id for run in running] + [parent]:
                    if client.get_run(run_id).info.status == "RUNNING":
                        client.set_terminated(run_id, "FAILED")
            except MlflowException:  # tracked elsewhere (another server or experiment): not ours to close
                continue
            record.update(mlflow_closed=True)

    def __enter__(self) -> "PipelineTracking":
        if not self.config.enabled:
            return self
        import mlflow

        uri = self.config.uri or default_tracking_uri(self.store_root)
        if self.config.uri is None:
            reroot_tracking_db(self.store_root / "mlflow.db", self.store_root, self.config.experiment)
        mlflow.set_tracking_uri(uri)
        experiment = self._first_contact(mlflow, uri)
        if self.config.uri is None:
            home_default_experiment(self.store_root / "mlflow.db", self.store_root)
        if experiment is None:
            # Artifacts next to the database, not in ./mlruns of whatever folder the user ran from.
            location = self.config.artifact_location or ((self.store_root / ARTIFACTS_FOLDER).as_uri() if self.config.uri is None else None)
            from mlflow.exceptions import MlflowException

            try:
                self.experiment_id = mlflow.create_experiment(self.config.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException as exc:  # another run created it between our lookup and here
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = mlflow.get_experiment_by_name(self.config.experiment)
                self.experiment_id = experiment.experiment_id
        else:
            self.experiment_id = experiment.experiment_id
            if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
                mlflow.MlflowClient().set_experiment_tag(self.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        mlflow.set_experiment(experiment_id=self.experiment_id)
        # The creation time tells a recreated experiment (a wiped database) from the one the index knew.
        created = experiment.creation_time if experiment is not None else mlflow.get_experiment(self.experiment_id).creation_time
        self._builders_key = f"{uri}|{self.experiment_id}|{created}"
        self._close_runs_of_dead_processes(mlflow)
        if self.resume_parent is not None:
            self._reopen_parent(mlflow)
            return self
        git = git_state()
        run = mlflow.start_run(
            run_name=self.run_name,
            tags={
                f"{TAG}kind": "pipeline",
                f"{TAG}run_id": self.run_id,
                f"{TAG}git_commit": git["commit"],
                f"{TAG}git_dirty": str(git["dirty"]),
                "mlflow.source.git.commit": git["commit"],
            },
        )
        self.parent_run_id = run.info.run_id
        mlflow.log_params(self.pipeline_params)
        mlflow.log_text(self.config_text, "config.yaml")
        return self

    def _reopen_parent(self, mlflow) -> None:
        """Continue the failed run's parent: its children left RUNNING by the crash are closed as
        FAILED, the parent goes back to RUNNING, and the stages of this attempt log under it."""
        client = mlflow.MlflowClient()
        running = client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.resume_parent}' and attributes.status = 'RUNNING'"
        )
        for child in running:
            client.set_terminated(child.info.run_id, "FAILED")
        run = mlflow.start_run(run_id=self.resume_parent)
        self.parent_run_id = run.info.run_id
        attempts = int(run.data.tags.get(f"{TAG}attempts", "1")) + 1
        mlflow.set_tags({f"{TAG}attempts": str(attempts), f"{TAG}resumed_by_git_commit": git_state()["commit"]})

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.config.enabled:
            return
        import mlflow

        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------ children
    @property
    def _builders_file(self) -> Path:
        return self.store_root / "cache" / "mlflow-builders.json"

    def _builder_index(self) -> dict:
        index = _read_json(self._builders_file).get(self._builders_key, {})
        return index if isinstance(index, dict) else {}

    def _remember_in(self, path: Path, update) -> None:
        """Read a JSON cache file of the store, let `update` change the dict, write it whole and
        rename. Stages of this run take turns; two runs writing at once can lose an entry, which
        only costs recomputing it next time."""
        with self._cache_lock:
            cache = _read_json(path)
            update(cache)
            write_json_atomic(path, cache)

    def _remember_builder(self, stage: str, fingerprint: str, run_id: str) -> None:
        """Note in the store which finished child run logged this artifact, for this server and
        experiment: an unchanged re-run then finds its builder without a search request per stage.
        Two runs writing at once can lose an entry, which only costs the search next time."""
        def add(index: dict) -> None:
            index.setdefault(self._builders_key, {})[f"{stage}/{fingerprint}"] = run_id

        self._remember_in(self._builders_file, add)

    def _builder_run(self, stage: str, fingerprint: str) -> str | None:
        """The finished child run that logged this artifact: the one that built it or, when that
        one never finished logging (its process was killed between publish and logging), the
        first later hit that back-filled it. Known from the store's index when an earlier run
        of this store logged it to this server's experiment; searched for otherwise."""
        import mlflow

        known = self._builder_index().get(f"{stage}/{fingerprint}")
        if known:
            return known
        for marker in (f"tags.`{TAG}cache_hit` = 'false'", f"tags.`{TAG}backfilled` = 'true'"):
            found = mlflow.search_runs(
                experiment_ids=[self.experiment_id],
                filter_string=f"tags.`{TAG}fingerprint` = '{fingerprint}' and {marker} and tags.`{TAG}stage` = '{stage}' and attributes.status = 'FINISHED'",
                max_results=1,
                output_format="list",
            )
            if found:
                self._remember_builder(stage, fingerprint, found[0].info.run_id)
                return found[0].info.run_id
        return None

    def _description(self, stage: str, artifact_path: str, upstream: dict[str, str | None], builder: str | None) -> str:
        lines = [f"**{stage}** — store folder `{artifact_path}`"]
        for name, run_id in upstream.items():
            if run_id:
                lines.append(f"- input `{name}`: [run {run_id[:8]}](#/experiments/{self.experiment_id}/runs/{run_id})")
        if builder:
            lines.append(f"- cached: built by [run {builder[:8]}](#/experiments/{self.experiment_id}/runs/{builder})")
        return "\n".join(lines)

    def log_stage(
        self,
        stage: str,
        outcome: StageOutcome,
        section,
        upstream: dict[str, str | None],
        datasets: list = (),
        log_model: bool = False,
        started: float | None = None,
        ended: float | None = None,
        model: str | None = None,
    ) -> str | None:
        """Log the stage's child run in full; returns its id (None when tracking is off).

        `datasets`: (name, artifact, path inside it, context); `started`/`ended`: epoch seconds."""
        begun = self.begin_stage_log(stage, outcome, section, upstream, datasets, log_model, started, ended, model)
        if begun is None:
            return None
        run_id, finish = begun
        finish()
        return run_id

    def begin_stage_log(
        self, stage: str, outcome: StageOutcome, section, upstream: dict[str, str | None], datasets: list = (), log_model: bool = False,
        started: float | None = None, ended: float | None = None, model: str | None = None,
    ):
        """Create the stage's child run now and return (its id, a call that logs the rest):
        parameters, metrics, datasets, files, registered models and the run's end. The id is all
        that the stages downstream link to, so the flow lets them start while the rest is sent."""
        if not self.config.enabled:
            return None
        steps = self._log_stage(stage, outcome, section, upstream, datasets, log_model, started, ended, model)
        with self._log_lock:
            run_id = next(steps)

        def finish() -> None:
            with self._log_lock:
                next(steps, None)

        return run_id, finish

    def _log_stage(self, stage, outcome, section, upstream, datasets, log_model, started, ended, model):
        """A generator: yields the child run's id once created, then logs the rest when resumed."""
        import mlflow
        from mlflow.entities import Metric

        artifact = outcome.artifact
        relative_path = artifact.manifest["path"]
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            f"{TAG}stage": stage,
            f"{TAG}run_id": self.run_id,
            f"{TAG}fingerprint": artifact.fingerprint,
            f"{TAG}digest": artifact.digest,
            f"{TAG}cache_hit": str(outcome.cache_hit).lower(),
            f"{TAG}artifact_path": relative_path,
            f"{TAG}git_commit": artifact.manifest.get("git", {}).get("commit", "unknown"),
            "mlflow.source.git.commit": artifact.manifest.get("git", {}).get("commit", "unknown"),
        }
        for name, run_id in upstream.items():
            if run_id:
                tags[f"{TAG}upstream.{name}"] = run_id
        builder = self._builder_run(stage, artifact.fingerprint) if outcome.cache_hit else None
        if builder:
            tags[f"{TAG}built_by_run"] = builder
        # A hit with no finished run that logged it: this run logs what the builder never did.
        backfill = outcome.cache_hit and builder is None
        if backfill:
            tags[f"{TAG}backfilled"] = "true"
        tags["mlflow.note.content"] = self._description(stage, relative_path, upstream, builder)
        hacking = artifact.manifest.get("reward_hacking")
        if isinstance(hacking, dict):  # the gate refuses a model with this flag in its lineage
            tags[f"{TAG}reward_hacking"] = str(bool(hacking.get("flag"))).lower()
            tags[f"{TAG}reward_hacking.detail"] = json.dumps(hacking)

        client = mlflow.MlflowClient()
        now = time.time()
        start_ms = int((started or now) * 1000)
        child = client.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=stage)
        run_id = child.info.run_id
        self.child_runs[stage] = run_id
        yield run_id
        params = _flatten("", section_payload(section), {})
        stamp = int((ended or now) * 1000)
        metrics = [
            Metric(key, float(value), stamp, 0)
            for key, value in artifact.metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        metrics.append(Metric("cache_hit", float(outcome.cache_hit), stamp, 0))
        # A hit whose builder run is known logs its parameters, final figures, datasets and links;
        # the per-step series and the files stay on the builder's run (tag built_by_run, and the
        # description's link), so an unchanged re-run does not upload them again.
        full = not outcome.cache_hit or backfill
        loss_file = artifact.path / "loss_history.json"
        if full and loss_file.is_file():
            metrics += [Metric("train_loss", p["loss"], stamp, p["step"]) for p in json.loads(loss_file.read_text())]
        # The manifest's per-step history (training and RL stages): a series per figure.
        metrics += [
            Metric(key, float(value), stamp, entry["step"])
            for entry in (artifact.manifest.get("history") or [] if full else [])
            for key, value in entry.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        from mlflow.entities import Param

        # One request for the parameters and the first metrics (log_batch: at most 100 params and
        # 1000 entries in all per call): each request to a tracking server costs more than its rows.
        param_list = [Param(key[:250], value[:6000]) for key, value in params.items()]
        batches, params_left, metrics_left = [], param_list, metrics
        while params_left or metrics_left or not batches:
            room = 900 - min(len(params_left), 100)
            batches.append((params_left[:100], metrics_left[:room]))
            params_left, metrics_left = params_left[100:], metrics_left[room:]
        for batch_params, batch_metrics in batches:
            if batch_params or batch_metrics:
                client.log_batch(run_id, metrics=batch_metrics, params=batch_params)
        if full:
            client.log_artifact(run_id, str(artifact.path / "manifest.json"))
        inputs = []
        for name, source_artifact, inner_path, context in datasets:
            inputs.append(self._dataset_input(name, source_artifact, inner_path, context))
        inputs += self._source_inputs(artifact)
        if inputs:
            _log_inputs(client, run_id, inputs)
        for extra in ("results.md", "results.json", "rejected.jsonl", "report.json", *sorted(p.name for p in artifact.path.glob("*.png"))):
            if full and (artifact.path / extra).is_file():
                client.log_artifact(run_id, str(artifact.path / extra))
        if full and (artifact.path / "table.json").is_file():  # the report's results, as an MLflow table
            client.log_table(run_id, data=json.loads((artifact.path / "table.json").read_text()), artifact_file="results_table.json")
        for folder in ("data_docs", "contracts"):  # GX Data Docs (HTML) and validation results
            if full and (artifact.path / folder).is_dir():
                client.log_artifacts(run_id, str(artifact.path / folder), artifact_path=folder)
        if log_model and self.config.log_models and (not outcome.cache_hit or backfill) and model is None:
            client.log_artifacts(run_id, str(artifact.path), artifact_path="model")
        if model is not None:
            self.register_models(client, model, artifact, run_id, params)
        client.set_terminated(run_id, "FINISHED", end_time=int((ended or time.time()) * 1000))
        if full:  # this run logged the artifact in full: later hits link to it
            self._remember_builder(stage, artifact.fingerprint, run_id)

    # ------------------------------------------------------------------ models and the registry
    @property
    def registered_model(self) -> str:
        return self.config.registered_model or self.run_name

    def register_models(self, client, model: str, artifact, run_id: str, params: dict) -> None:
        """Each model of the artifact (a quantize artifact holds one per variant) as an MLflow 3
        logged model linked to this run, with its params and metrics, registered as a version of
        `registered_model`. With `log_models: false` the logged model is a reference to the store
        folder and no bytes are uploaded. A model already registered (same digest) is reused."""
        from mlflow.exceptions import MlflowException

        if not self._registered_model_exists:  # once per run, not once per model stage
            try:
                client.get_registered_model(self.registered_model)
            except MlflowException:
                try:
                    client.create_registered_model(self.registered_model, tags={f"{TAG}kind": "posttrain models"})
                except MlflowException as exc:
                    # Two runs at once both found it missing; the other one created it first.
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            self._registered_model_exists = True
        variants = artifact.manifest.get("variants") or [None]
        for variant in variants:
            name = f"{model}-{variant}" if variant else model
            folder = artifact.path / variant if variant else artifact.path
            store_path = f"{artifact.manifest['path']}/{variant}" if variant else artifact.manifest["path"]
            existing = client.search_model_versions(
                f"name = '{self.registered_model}' and tags.`{TAG}digest` = '{artifact.digest}' and tags.`{TAG}model` = '{name}'"
            )
            if existing:
                self.model_versions[name] = existing[0].version
                continue
            tags = {f"{TAG}model": name, f"{TAG}digest": artifact.digest, f"{TAG}store_path": store_path, f"{TAG}run_id": self.run_id, f"{TAG}stage_run": run_id}
            metrics = {key: float(value) for key, value in artifact.metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
            logged = client.create_logged_model(
                self.experiment_id, name=name, source_run_id=run_id, tags=tags, params=dict(list(params.items())[:100]), model_type="transformers-causal-lm"
            )
            if self.config.log_models:
                client.log_model_artifacts(logged.model_id, str(folder))
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(f"model.{name}.{key}", value, now, 0, model_id=logged.model_id) for key, value in list(metrics.items())[:200]])
            client.finalize_logged_model(logged.model_id, "READY")
            version = client.create_model_version(
                self.registered_model, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id,
                description=f"{name} from run {self.run_id}; store folder `{store_path}`",
            )
            self.model_versions[name] = version.version

    def champion(self):
        """The registered model's `champion` version, or None (also when tracking is off)."""
        if not self.config.enabled:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            return mlflow.MlflowClient().get_model_version_by_alias(self.registered_model, CHAMPION)
        except MlflowException:
            return None

    def champion_folder(self, version, store_root: Path):
        """The champion's model folder as an Artifact: in this store when its folder is here and
        unchanged, else its uploaded weights downloaded into the store's cache; None if neither."""
        import mlflow

        from posttrain.artifacts import Artifact, digest_dir

        tags = version.tags
        local = Path(store_root) / tags.get(f"{TAG}store_path", "\0")
        if local.is_dir() and (local / "config.json").is_file():
            return Artifact(local, {"digest": digest_dir(local), "path": tags[f"{TAG}store_path"]})
        target = Path(store_root) / "cache" / "champion" / f"v{version.version}"
        if not target.is_dir():
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target))
            except Exception:  # an external (reference-only) model, or an unreachable artifact store
                return None
        folders = [path.parent for path in target.rglob("config.json")]
        if not folders:
            return None
        return Artifact(folders[0], {"digest": digest_dir(folders[0]), "path": folders[0].relative_to(store_root).as_posix()})

    def apply_gate(self, candidate: str, promote: bool, gate: dict) -> str | None:
        """Tag the decision on the pipeline run and on the candidate's version; move `champion` to
        it when promoted. Returns the candidate's version."""
        if not self.config.enabled:
            return None
        import mlflow

        from concurrent.futures import ThreadPoolExecutor

        from mlflow.entities import RunTag

        client = mlflow.MlflowClient()
        version = self.model_versions.get(candidate)
        tags = {f"{TAG}gate.{key}": str(value) for key, value in gate.items()}
        client.log_batch(self.parent_run_id, tags=[RunTag(key, value) for key, value in tags.items()])  # one request
        if version is not None:
            # The registry has no batch call: one request per tag, sent together (serially to the
            # store's own SQLite file, which takes one writer at a time).
            with ThreadPoolExecutor(len(tags) if self._concurrent else 1) as pool:
                list(pool.map(lambda item: client.set_model_version_tag(self.registered_model, version, *item), tags.items()))
        if promote and version is not None:
            client.set_registered_model_alias(self.registered_model, CHAMPION, version)
        return version

    @staticmethod
    def _source_inputs(artifact) -> list:
        """The data stage's sources as MLflow datasets, context "source": each names its file (or,
        when the run generated it, the copy in the store) and carries its sha256 as the digest
        (the first 32 hex digits: MLflow's column is 36 characters), so the UI shows which bytes
        the data came from."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.tracking.fluent import _create_dataset_input

        found = []
        outside = artifact.manifest.get("outside", {})
        for index, source in enumerate(artifact.manifest.get("sources") or []):
            digest = outside.get(f"data.sources[{index}]")
            if digest is None:  # generated by the run: its file is in the artifact
                location, digest = f"{artifact.manifest['path']}/{source['source']}", artifact.manifest.get("files", {}).get(source["source"], [None, None, ""])[2]
            else:
                location = source["source"]
            name = f"{source.get('role')}:{Path(str(source['source'])).name}"
            dataset = MetaDataset(LocalArtifactDatasetSource(str(location)), name=name, digest=str(digest).removeprefix("sha256:")[:32] or None)
            found.append(_create_dataset_input(dataset, "source", None))
        return found

    def _dataset_input(self, name: str, source_artifact, inner_path: str, context: str):
        """A split of an artifact as an MLflow dataset (pandas: its digest, schema and row count).
        The artifact is content-addressed, so what pandas found is kept in the store's
        cache/mlflow-datasets.json and an unchanged re-run does not read the split again."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        memo_file = self.store_root / "cache" / "mlflow-datasets.json"
        key = f"{source_artifact.digest}/{inner_path}/{name}"
        fields = _read_json(memo_file).get(key)
        if not isinstance(fields, dict) or set(fields) != set(DATASET_FIELDS):
            import mlflow
            import pandas as pd

            frame = pd.read_json(source_artifact.path / inner_path, lines=True)
            # The source names the file inside the store, relative to the store root.
            entity = mlflow.data.from_pandas(frame, source=f"{source_artifact.manifest['path']}/{inner_path}", name=name)._to_mlflow_entity()
            fields = {field: getattr(entity, field) for field in DATASET_FIELDS}
            def add(memo: dict) -> None:
                memo[key] = fields

            self._remember_in(memo_file, add)
        return DatasetInput(dataset=Dataset(**fields), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])
