"""The pipeline as one Prefect flow: the steps of flows/plan.py, each a cached Prefect task.

    posttrain run configs/demo.yaml                   # the usual way in (posttrain.cli)
    pipeline(cfg, record_path, config_text)       # record: posttrain.runs.RunRecord.start(...)

Each stage is a Prefect task whose cache key is our fingerprint (posttrain.fingerprint) and whose
result — the artifact's path relative to the store root, so a moved or copied store still
resolves to its own folders — is persisted as JSON, so a new process reuses it. A Prefect cache
hit is honoured only while the stored artifact exists and matches its manifest: otherwise the task
is forced to refresh and posttrain.runner rebuilds it (or refuses a tampered one). After each
stage the flow logs a nested MLflow run and rewrites runs/<run id>/run.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from prefect import flow, task
from prefect.context import get_run_context
from rich.console import Console

from flows.plan import Step, needs_candidate, plan, upstream
from posttrain import failpoints
from posttrain.artifacts import Artifact
from posttrain.config import PipelineConfig
from posttrain.dag import in_background, run_when_ready
from posttrain.fingerprint import parse_code_ahead
from posttrain.gate import Decision, decide, hacking_flags
from posttrain.remote import open_store
from posttrain.report import choose_candidate
from posttrain.runner import StageError, StageOutcome, compute_key, execute_stage
from posttrain.runs import RunRecord, now
from posttrain.tracking import PipelineTracking

console = Console(stderr=True, highlight=False)


def _stage_cache_key(context, parameters: dict) -> str:
    return f"{parameters['stage']}-{parameters['key'].fingerprint}"


@task(cache_key_fn=_stage_cache_key, persist_result=True, result_serializer="json")
def stage_task(
    stage: str, key, module_name: str, section, input_paths: dict[str, str], root: str, seed: int, launcher, threads: int, device: str, run_id: str,
    force: bool = False, shared_store: str | None = None, shared_store_options: dict | None = None,
) -> dict:
    """Build (or find in the store) one stage's artifact; returns where it is (relative to the store root) and who built it."""
    store = open_store(Path(root), shared_store, shared_store_options)
    inputs = {name: Artifact.load(store.root / path) for name, path in input_paths.items()}
    outcome = execute_stage(stage, module_name, section, inputs, store, seed, launcher, threads, device, run_id, key, force)
    return {
        "path": outcome.artifact.manifest["path"],
        "built_by_flow_run": str(get_run_context().task_run.flow_run_id),
        "store_hit": outcome.cache_hit,
        "seconds": outcome.seconds,
    }


class PipelineRun:
    """The state one flow run carries: store, run record, MLflow tracking, artifacts by stage."""

    def __init__(self, cfg: PipelineConfig, record: RunRecord, tracking: PipelineTracking, flow_run_id: str, force_from: str | None = None):
        self.force_from = force_from  # `posttrain rerun --from`: this stage and everything downstream are rebuilt
        self.forced: set[str] = set()
        self.cfg = cfg
        self.root = Path(cfg.store_root).resolve()
        self.store = open_store(self.root, cfg.shared_store, cfg.shared_store_options)
        self.record = record
        self.tracking = tracking
        self.flow_run_id = flow_run_id
        self.artifacts: dict[str, Artifact] = {}
        # Stages overlap (runtime.parallel_stages) only where that costs this machine nothing:
        # cache hits, whose time is MLflow and Prefect requests, and stages on a pool's workers.
        # A stage built here holds this lock: training stages seed the process-wide RNGs and use
        # every thread they are given, so two at once would neither reproduce nor run faster.
        self.build_lock = threading.Lock()
        self._log_threads: list[threading.Thread] = []
        self._log_errors: list[BaseException] = []

    def run_steps(self, steps: list[Step]) -> None:
        """Each step once the steps it takes inputs from are done (posttrain.dag), then the end of
        their MLflow logging: stages already published are logged even when a later one failed."""
        self.record.plan([step.name for step in steps])
        parse_code_ahead([step.module for step in steps])
        try:
            run_when_ready(steps, lambda step: set(step.inputs.values()), lambda step: step.name, self.stage, self.cfg.runtime.parallel_stages)
        except BaseException:
            self._join_logs(raise_error=False)
            raise
        self._join_logs(raise_error=True)
        # Stages finish in whatever order they ran in; the artifacts keep the plan's, so what reads
        # them in order (a tie between models goes to the first, posttrain.report.choose_candidate)
        # decides the same way every run. Earlier phases' artifacts stay first (sorted is stable).
        position = {step.name: i for i, step in enumerate(steps)}
        self.artifacts = dict(sorted(self.artifacts.items(), key=lambda item: position.get(item[0], -1)))

    def _finish_log(self, stage: str, finish) -> None:
        """The rest of a stage's MLflow logging (parameters, metrics, files, the registry, its end):
        here and now when stages go one by one, else on a thread of its own, so the stages
        downstream, which only need the child run's id, start at once."""
        if self.cfg.runtime.parallel_stages == 1:
            finish()
            return
        def done(error: BaseException | None) -> None:
            if error is not None:
                self._log_errors.append(error)  # raised by _join_logs, in the flow's thread

        self._log_threads.append(in_background(f"log-{stage}", finish, done))

    def _join_logs(self, raise_error: bool) -> None:
        while self._log_threads:
            self._log_threads.pop().join()
        if self._log_errors and raise_error:
            error = self._log_errors[0]
            self._log_errors.clear()
            raise error

    def on_worker(self, step: Step, key, input_artifacts: dict[str, Artifact], force: bool) -> dict:
        """Run the stage as a flow run on a worker of its pool (flows/stage_flow.py) and wait; the
        worker publishes to the shared store, from which this store then pulls the artifact."""
        from prefect.deployments import run_deployment

        pool = step.launcher.pool
        if not os.environ.get("PREFECT_API_URL"):
            raise StageError(f"{step.name}: launcher kind deployment needs a Prefect server the pool's worker polls (set PREFECT_API_URL)")
        started = time.perf_counter()
        console.print(f"  on a worker of pool {pool} (posttrain-stage/{pool})")
        flow_run = run_deployment(
            f"posttrain-stage/{pool}",
            parameters={
                "stage": step.name, "module": step.module, "section_class": type(step.section).__name__,
                "section": step.section.model_dump(mode="json"), "inputs": {name: a.manifest["path"] for name, a in input_artifacts.items()},
                "key": {"fingerprint": key.fingerprint, "parts": key.parts}, "shared_store": self.cfg.shared_store,
                "shared_store_options": self.cfg.shared_store_options, "seed": self.cfg.seed, "threads": self.cfg.runtime.threads,
                "device": self.cfg.runtime.device, "run_id": self.record.run_id, "force": force,
            },
            timeout=None,  # as long as the stage takes
            as_subflow=True,
        )
        if not flow_run.state.is_completed():
            raise StageError(f"{step.name}: its flow run on pool {pool} ended {flow_run.state.name}: {flow_run.state.message or 'see the worker log'}")
        artifact = self.store.lookup(step.name, key.fingerprint)
        if artifact is None:
            raise StageError(f"{step.name}: the worker of pool {pool} finished but {self.cfg.shared_store} has no {step.name}/{key.fingerprint}")
        # Dispatched because neither store had it: built for this run (on the worker).
        return {"path": artifact.manifest["path"], "built_by_flow_run": self.flow_run_id, "store_hit": False, "seconds": time.perf_counter() - started}

    def _stage_task(self, step: Step, key, input_artifacts: dict[str, Artifact], force: bool, in_store: bool) -> dict:
        return stage_task.with_options(name=step.name, task_run_name=step.name, refresh_cache=force or not in_store)(
            stage=step.name,
            key=key,
            module_name=step.module,
            section=step.section,
            input_paths={name: artifact.manifest["path"] for name, artifact in input_artifacts.items()},
            root=str(self.root),
            seed=self.cfg.seed,
            launcher=step.launcher,
            threads=self.cfg.runtime.threads,
            device=self.cfg.runtime.device,
            run_id=self.record.run_id,
            force=force,
            shared_store=self.cfg.shared_store,
            shared_store_options=self.cfg.shared_store_options,
        )

    def stage(self, step: Step) -> Artifact:
        input_artifacts = {name: self.artifacts[source] for name, source in step.inputs.items()}
        if step.name == self.force_from or set(step.inputs.values()) & self.forced:
            self.forced.add(step.name)
        force = step.name in self.forced
        started_wall, started = time.time(), time.perf_counter()
        self.record.stage_started(step.name, None)
        holds_lock = False
        try:
            key = compute_key(step.name, step.module, step.section, input_artifacts, self.store)
            self.record.stage_update(step.name, {"fingerprint": key.fingerprint})
            in_store = self.store.lookup(step.name, key.fingerprint) is not None
            on_worker = step.launcher is not None and step.launcher.kind == "deployment" and (force or not in_store)
            if (force or not in_store) and not on_worker:  # built in this process: one at a time
                if not self.build_lock.acquire(blocking=False):
                    self.record.stage_update(step.name, {"state": "waiting"})
                    self.build_lock.acquire()
                    # The stage's seconds and start are its own, not the wait for its turn.
                    started_wall, started = time.time(), time.perf_counter()
                    self.record.stage_update(step.name, {"state": "running", "started_at": now()})
                holds_lock = True
            console.print(f"[bold]▶ {step.name}[/] [dim]{key.fingerprint}[/]")
            result = self.on_worker(step, key, input_artifacts, force) if on_worker else self._stage_task(step, key, input_artifacts, force, in_store)
        except BaseException as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.record.stage_finished(step.name, {"state": "failed", "error": message, "seconds": round(time.perf_counter() - started, 2)})
            raise
        finally:
            if holds_lock:
                self.build_lock.release()
        artifact = Artifact.load(self.root / result["path"])
        cache_hit = result["store_hit"] or result["built_by_flow_run"] != self.flow_run_id
        outcome = StageOutcome(artifact, cache_hit, time.perf_counter() - started)
        self.artifacts[step.name] = artifact
        upstream = {name: self.tracking.child_runs.get(source) for name, source in step.inputs.items()}
        datasets = [(ref.name, self.artifacts[ref.stage], ref.path, ref.context) for ref in step.datasets]
        failpoints.reach("published", stage=step.name)
        begun = self.tracking.begin_stage_log(step.name, outcome, step.section, upstream, datasets, step.log_model, started_wall, time.time(), step.model)
        child_run = None
        if begun is not None:
            child_run, finish_log = begun
            self._finish_log(step.name, finish_log)
        self.record.stage_finished(
            step.name,
            {
                "state": "cached" if cache_hit else "built",
                "path": artifact.manifest["path"],
                "cache_hit": cache_hit,
                "seconds": round(outcome.seconds, 2),
                "mlflow_run_id": child_run,
                "metrics": artifact.metrics,
            },
        )
        if step.name == "report":  # the run's results, in the one schema, for `posttrain status --json`
            self.record.update(results=json.loads((artifact.path / "results.json").read_text()), candidate=artifact.manifest["candidate"])
        label = "[green]cached[/]" if cache_hit else f"[green]built[/] in {artifact.manifest.get('seconds', 0):.1f}s"
        console.print(f"  {label}" if self.cfg.runtime.parallel_stages == 1 else f"  {step.name} {label}")
        return artifact


def evaluation_results(run: PipelineRun) -> dict[str, dict]:
    """Each scored model's results.json, from this run's evaluate-<model> artifacts."""
    return {
        name.removeprefix("evaluate-"): json.loads((artifact.path / "results.json").read_text())
        for name, artifact in run.artifacts.items()
        if name.startswith("evaluate-")
    }


def run_gate(run: PipelineRun, cfg: PipelineConfig) -> dict:
    """Promote the report's candidate to `champion` if it beats the current one (posttrain.gate)."""
    report = run.artifacts["report"]
    candidate = report.manifest["candidate"]
    results = json.loads((report.path / "results.json").read_text())
    metric = cfg.gate.primary_metric
    score = results[candidate]["mean"][metric]
    quantized_name = f"quantize-{cfg.gate.quantized_method}"
    # The variant is the candidate's only when the candidate is what was quantized.
    quantized_source = run.artifacts["quantize"].manifest["inputs"]["source"]["digest"] if "quantize" in run.artifacts else None
    candidate_stage = {"student": "distill"}.get(candidate, candidate)
    quantized = results.get(quantized_name, {}).get("mean", {}).get(metric)
    if quantized_source is None or candidate_stage not in run.artifacts or run.artifacts[candidate_stage].digest != quantized_source:
        quantized = None
    hacking = hacking_flags(run.root, run.artifacts[candidate_stage].manifest["path"])
    champion = run.tracking.champion()
    champion_score = None
    if not hacking and champion is not None and run.tracking.model_versions.get(candidate) == champion.version:
        return _record_gate(run, candidate, score, score, Decision(False, "the candidate already is the champion"), champion)
    if champion is not None:
        folder = run.tracking.champion_folder(champion, run.root)
        if folder is None:
            decision = Decision(False, f"champion v{champion.version} cannot be re-scored here (its store folder is absent and no weights were uploaded)")
            return _record_gate(run, candidate, score, None, decision)
        scored_here = [
            artifact for name, artifact in run.artifacts.items()
            if name.startswith("evaluate-") and not artifact.manifest.get("variant") and artifact.manifest["inputs"]["model"]["digest"] == folder.digest
        ]
        if scored_here:  # the champion is a model this run already scored, on these benchmarks
            evaluated = scored_here[0]
        else:
            step = next(step for step in plan(cfg, candidate) if step.name == "evaluate-sft")
            run.artifacts["champion-model"] = folder
            evaluated = run.stage(Step("evaluate-champion", step.module, step.section, {**step.inputs, "model": "champion-model"}))
        champion_score = json.loads((evaluated.path / "results.json").read_text())["mean"][metric]
    decision = decide(score, champion_score, cfg.gate.margin, quantized, cfg.gate.quantized_budget, hacking, metric)
    return _record_gate(run, candidate, score, champion_score, decision, champion)


def _record_gate(run: PipelineRun, candidate: str, score: float, champion_score: float | None, decision: Decision, champion=None) -> dict:
    gate = {
        "candidate": candidate,
        "candidate_score": score,
        "champion_version": champion.version if champion is not None else None,
        "champion_score": champion_score,
        "decision": "promoted" if decision.promote else "kept champion",
        "reason": decision.reason,
    }
    gate["version"] = run.tracking.apply_gate(candidate, decision.promote, gate)
    run.record.update(gate=gate)
    verb = "[green]promoted[/]" if decision.promote else "[yellow]not promoted[/]"
    console.print(f"[bold]▶ gate[/] {candidate} {verb}: {decision.reason}")
    return gate


@flow(name="posttrain", log_prints=False, persist_result=False)
def pipeline(
    cfg: PipelineConfig, record_path: str, config_text: str, until: str | None = None, resume_parent: str | None = None, force_from: str | None = None
) -> dict:
    """The whole plan, then the gate; with `until`, only that stage and what it depends on (no gate).
    `resume_parent`: continue a failed run under its MLflow parent run (`posttrain resume`);
    `force_from`: rebuild that stage and everything downstream of it (`posttrain rerun --from`)."""
    record = RunRecord.load(Path(record_path))
    flow_run_id = str(get_run_context().flow_run.id)
    record.update(prefect_flow_run_id=flow_run_id)
    params = {"config_path": record.data["config_path"], "run_name": cfg.run_name, "run_id": record.run_id, "seed": cfg.seed, "store_root": cfg.store_root}
    root = Path(cfg.store_root).resolve()
    with PipelineTracking(cfg.tracking, root, record.run_id, cfg.run_name, config_text, params, resume_parent) as tracking:
        record.update(mlflow_parent_run_id=tracking.parent_run_id)
        run = PipelineRun(cfg, record, tracking, flow_run_id, force_from)
        try:
            steps = plan(cfg)
            if until is not None:
                record.update(until=until)
                needed = upstream(steps, until)
                steps = [step for step in steps if step.name in needed]
            run.run_steps(steps)
            if until is None and needs_candidate(cfg):
                # Quantize what the gate will consider: the best model so far, then score its variants.
                candidate = choose_candidate(evaluation_results(run), cfg.gate.candidate, cfg.gate.eligible, cfg.gate.primary_metric)
                run.run_steps([step for step in plan(cfg, candidate) if step.name not in run.artifacts])
            if until is None and cfg.gate.enabled and cfg.tracking.enabled:
                run_gate(run, cfg)
                run._join_logs(raise_error=True)  # the champion's evaluation, when the gate scored it
        except BaseException:
            run._join_logs(raise_error=False)
            record.finish("failed")
            raise
        record.finish("succeeded")
    return record.data
