"""The pipeline as one Prefect flow: wiring only — which stage gets which artifacts.

    posttrain run configs/demo.yaml            # the usual way in (posttrain.cli)
    pipeline(cfg, config_path, config_yaml)    # the flow itself

    base ──┬─▶ data ──┬─▶ sft ──┬─▶ reward
    bench ─┘          │         ├─▶ align-<method> (dpo)
                      │         ├─▶ distill (teacher by config) ─┐
                      │         └─▶ quantize (source by config) ◀┘
    base, sft, align-*, student, quantize-* ─▶ evaluate ◀─ bench

Each stage is a Prefect task whose cache key is our fingerprint (posttrain.fingerprint) and whose
result (the artifact's path) is persisted as JSON on local disk, so a new process reuses it. A
Prefect cache hit is honoured only while the stored manifest exists: otherwise the task is forced
to refresh and posttrain.runner rebuilds the artifact. After each stage the flow logs a nested
MLflow run and updates runs/<run>/run.json.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, task
from prefect.context import get_run_context
from rich.console import Console

import tasks.base
import tasks.benchmarks
import tasks.data
import tasks.distill
import tasks.evaluate
import tasks.quantize
import tasks.reward
import tasks.sft
from posttrain.artifacts import Artifact, Store, write_json_atomic
from posttrain.config import PipelineConfig
from posttrain.fingerprint import fingerprint
from posttrain.runner import StageOutcome, execute_stage
from posttrain.tracking import PipelineTracking
from tasks.align import dpo

ALIGN_MODULES = {"dpo": dpo}
DATA_CONTRACT_FILES = tuple(sorted((Path(__file__).resolve().parents[1] / "data_contracts").glob("*.*")))
console = Console(stderr=True, highlight=False)


def _stage_cache_key(context, parameters: dict) -> str:
    return f"{parameters['stage']}-{parameters['key']}"


@task(cache_key_fn=_stage_cache_key, persist_result=True, result_serializer="json")
def stage_task(stage: str, key: str, module_name: str, section, input_paths: dict[str, str], root: str, seed: int, launcher, threads: int, extra_files: list[str]) -> dict:
    """Build (or find in the store) one stage's artifact; returns where it is and who built it."""
    import importlib

    module = importlib.import_module(module_name)
    store = Store(Path(root))
    inputs = {name: Artifact.load(Path(path)) for name, path in input_paths.items()}
    outcome = execute_stage(stage, module, section, inputs, store, seed, launcher, threads, tuple(Path(f) for f in extra_files))
    if outcome.artifact.fingerprint != key:
        raise RuntimeError(f"{stage}: fingerprint mismatch between flow ({key}) and runner ({outcome.artifact.fingerprint})")
    return {"path": str(outcome.artifact.path), "built_by_flow_run": str(get_run_context().task_run.flow_run_id), "store_hit": outcome.cache_hit, "seconds": outcome.seconds}


class PipelineRun:
    """The state one flow run carries: store, run record, MLflow tracking, artifacts by stage."""

    def __init__(self, cfg: PipelineConfig, config_path: str, tracking: PipelineTracking, flow_run_id: str):
        self.cfg = cfg
        self.root = Path(cfg.store_root).resolve()
        self.store = Store(self.root)
        self.tracking = tracking
        self.flow_run_id = flow_run_id
        self.artifacts: dict[str, Artifact] = {}
        self.record_path = self.root / "runs" / cfg.run_name / "run.json"
        self.record = {
            "run_name": cfg.run_name,
            "config_path": config_path,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "prefect_flow_run_id": flow_run_id,
            "mlflow_parent_run_id": tracking.parent_run_id,
            "stages": {},
        }
        write_json_atomic(self.record_path, self.record, sort_keys=False)

    def stage(self, stage: str, module, section, inputs: dict[str, str], launcher=None, extra_files=(), datasets=(), log_model=False) -> Artifact:
        """Run one stage; `inputs` maps input names to the stages that produced them."""
        input_artifacts = {name: self.artifacts[source] for name, source in inputs.items()}
        key = fingerprint(stage, module, section, input_artifacts, self.cfg.seed, tuple(extra_files))
        in_store = self.store.lookup(stage, key) is not None
        console.print(f"[bold]▶ {stage}[/] [dim]{key}[/]")
        self.record["stages"][stage] = {"state": "running", "fingerprint": key}
        write_json_atomic(self.record_path, self.record, sort_keys=False)
        started = time.perf_counter()
        try:
            result = stage_task.with_options(name=stage, task_run_name=stage, refresh_cache=not in_store)(
                stage=stage,
                key=key,
                module_name=module.__name__,
                section=section,
                input_paths={name: str(artifact.path) for name, artifact in input_artifacts.items()},
                root=str(self.root),
                seed=self.cfg.seed,
                launcher=launcher,
                threads=self.cfg.runtime.threads,
                extra_files=[str(f) for f in extra_files],
            )
        except BaseException as exc:
            self.record["stages"][stage] = {"state": "failed", "fingerprint": key, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
            self.record["status"] = "failed"
            write_json_atomic(self.record_path, self.record, sort_keys=False)
            raise
        artifact = Artifact.load(Path(result["path"]))
        cache_hit = result["store_hit"] or result["built_by_flow_run"] != self.flow_run_id
        outcome = StageOutcome(artifact, cache_hit, time.perf_counter() - started)
        self.artifacts[stage] = artifact
        upstream = {name: self.tracking.child_runs.get(source) for name, source in inputs.items()}
        child_run = self.tracking.log_stage(stage, outcome, section, upstream, datasets, log_model)
        self.record["stages"][stage] = {
            "state": "cached" if cache_hit else "built",
            "fingerprint": key,
            "path": artifact.manifest.get("path"),
            "cache_hit": cache_hit,
            "seconds": round(outcome.seconds, 2),
            "mlflow_run_id": child_run,
            "metrics": artifact.metrics,
        }
        write_json_atomic(self.record_path, self.record, sort_keys=False)
        label = "[green]cached[/]" if cache_hit else f"[green]built[/] in {artifact.manifest.get('seconds', 0):.1f}s"
        console.print(f"  {label}")
        return artifact

    def finish(self, status: str) -> None:
        self.record["status"] = status
        self.record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.record_path, self.record, sort_keys=False)


def _with_seed(section, seed: int):
    return section if section.seed is not None else section.model_copy(update={"seed": seed})


@flow(name="posttrain", log_prints=False)
def pipeline(cfg: PipelineConfig, config_path: str, config_yaml: str) -> dict:
    root = Path(cfg.store_root).resolve()
    flow_run_id = str(get_run_context().flow_run.id)
    params = {"config_path": config_path, "run_name": cfg.run_name, "seed": cfg.seed, "store_root": str(root)}
    with PipelineTracking(cfg.tracking, root, cfg.run_name, config_yaml, params) as tracking:
        run = PipelineRun(cfg, config_path, tracking, flow_run_id)
        try:
            _wire(run, cfg)
        except BaseException:
            run.finish("failed")
            raise
        run.finish("succeeded")
    return run.record


def _wire(run: PipelineRun, cfg: PipelineConfig) -> None:
    def data_split(role: str) -> Path:
        return run.artifacts["data"].path / role / "train.jsonl"

    run.stage("base", tasks.base, _with_seed(cfg.model, cfg.seed), {}, log_model=True)
    run.stage("benchmarks", tasks.benchmarks, cfg.benchmarks, {})
    run.stage("data", tasks.data, cfg.data, {"base": "base", "benchmarks": "benchmarks"}, extra_files=DATA_CONTRACT_FILES)
    run.stage(
        "sft", tasks.sft, _with_seed(cfg.sft, cfg.seed), {"base": "base", "data": "data"},
        launcher=cfg.sft.launcher, datasets=[("instruction-train", data_split("instruction"), "training")], log_model=True,
    )
    run.stage(
        "reward", tasks.reward, _with_seed(cfg.reward, cfg.seed), {"init": cfg.reward.init_from, "data": "data"},
        launcher=cfg.reward.launcher, datasets=[("preference-train", data_split("preference"), "training")], log_model=True,
    )
    aligned = []
    align_sections = {"dpo": cfg.align.dpo}
    for method in cfg.align.methods:
        section = _with_seed(align_sections[method], cfg.seed)
        run.stage(
            f"align-{method}", ALIGN_MODULES[method], section, {"sft": "sft", "data": "data"},
            launcher=section.launcher, datasets=[("preference-train", data_split("preference"), "training")], log_model=True,
        )
        aligned.append(f"align-{method}")
    run.stage(
        "distill", tasks.distill, _with_seed(cfg.distill, cfg.seed), {"teacher": cfg.distill.teacher, "data": "data"},
        launcher=cfg.distill.launcher, datasets=[("instruction-train", data_split("instruction"), "training")], log_model=True,
    )
    quantize_source = "distill" if cfg.quantize.source == "student" else cfg.quantize.source
    run.stage("quantize", tasks.quantize, _with_seed(cfg.quantize, cfg.seed), {"source": quantize_source, "data": "data"}, log_model=True)
    models = {"base": "base", "sft": "sft", **{name: name for name in aligned}, "student": "distill", "quantize": "quantize"}
    benchmark_files = [(f"{name}-benchmark", run.artifacts["benchmarks"].path / f"{name}.jsonl", "evaluation") for name in cfg.benchmarks]
    run.stage("evaluate", tasks.evaluate, cfg.evaluate, {"benchmarks": "benchmarks", **models}, datasets=benchmark_files)
