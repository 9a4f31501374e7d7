"""The DAG as data: which stage runs which module on which config section, with which named inputs.

    for step in plan(cfg):
        step.name, step.module, step.section, step.inputs   # inputs: {input name: producing stage}

    base ──┬─▶ data ──┬─▶ sft ──┬─▶ reward                 (init: sft or base)
    bench ─┘          │         ├─▶ align-dpo              (sft, data: no reward input)
                      │         ├─▶ distill                (teacher by config)
                      │         └─▶ quantize               (source by config)
    base, sft, align-*, student, quantize-* ─▶ evaluate ◀─ bench

Wiring only, and no Prefect, MLflow or stage imports: the flow (flows/pipeline.py) runs these
steps as Prefect tasks, and tests, `posttrain rerun --from` and lineage read the same edges.
Modules are named, not imported, so a run that is all cache hits never loads a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import LauncherConfig, PipelineConfig


@dataclass(frozen=True)
class DatasetRef:
    """A file of an input artifact that the stage reads, logged to MLflow as a dataset."""

    name: str
    stage: str  # the producing stage
    path: str  # inside that stage's artifact
    context: str  # "training" or "evaluation"


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    section: object
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> producing stage
    launcher: LauncherConfig | None = None
    datasets: tuple[DatasetRef, ...] = ()
    log_model: bool = False


def _with_seed(section, seed: int):
    return section if section.seed is not None else section.model_copy(update={"seed": seed})


def plan(cfg: PipelineConfig) -> list[Step]:
    instruction = (DatasetRef("instruction-train", "data", "instruction/train.jsonl", "training"),)
    preference = (DatasetRef("preference-train", "data", "preference/train.jsonl", "training"),)
    steps = [
        Step("base", "tasks.base", _with_seed(cfg.model, cfg.seed), log_model=True),
        Step("benchmarks", "tasks.benchmarks", cfg.benchmarks),
        Step("data", "tasks.data", cfg.data, {"base": "base", "benchmarks": "benchmarks"}),
        Step("sft", "tasks.sft", _with_seed(cfg.sft, cfg.seed), {"base": "base", "data": "data"}, cfg.sft.launcher, instruction, True),
        Step(
            "reward", "tasks.reward", _with_seed(cfg.reward, cfg.seed), {"init": cfg.reward.init_from, "data": "data"},
            cfg.reward.launcher, preference, True,
        ),
    ]
    aligned = []
    if "dpo" in cfg.align.methods:
        dpo = _with_seed(cfg.align.dpo, cfg.seed)
        steps.append(Step("align-dpo", "tasks.align.dpo", dpo, {"sft": "sft", "data": "data"}, dpo.launcher, preference, True))
        aligned.append("align-dpo")
    steps.append(
        Step(
            "distill", "tasks.distill", _with_seed(cfg.distill, cfg.seed), {"teacher": cfg.distill.teacher, "data": "data"},
            cfg.distill.launcher, instruction, True,
        )
    )
    quantize_source = "distill" if cfg.quantize.source == "student" else cfg.quantize.source
    steps.append(Step("quantize", "tasks.quantize", cfg.quantize, {"source": quantize_source, "data": "data"}, log_model=True))
    models = {"base": "base", "sft": "sft", **{name: name for name in aligned}, "student": "distill", "quantize": "quantize"}
    benchmark_files = tuple(DatasetRef(f"{name}-benchmark", "benchmarks", f"{name}.jsonl", "evaluation") for name in cfg.benchmarks)
    steps.append(Step("evaluate", "tasks.evaluate", cfg.evaluate, {"benchmarks": "benchmarks", **models}, datasets=benchmark_files))
    return steps


def downstream(steps: list[Step], start: str) -> list[str]:
    """`start` and every step that depends on it, directly or not, in plan order."""
    affected = {start}
    for step in steps:
        if set(step.inputs.values()) & affected:
            affected.add(step.name)
    return [step.name for step in steps if step.name in affected]
