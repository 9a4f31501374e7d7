"""The DAG as data: which stage runs which module on which config section, with which named inputs.

    for step in plan(cfg):
        step.name, step.module, step.section, step.inputs   # inputs: {input name: producing stage}

    base ──┬─▶ data ──┬─▶ sft ──┬─▶ reward                 (init: sft or base)
    bench ─┘          │         ├─▶ align-dpo              (sft, data: no reward input)
                      │         ├─▶ align-ppo              (sft, data; reward when its critic or a reward_model term reads it)
                      │         ├─▶ align-grpo             (sft, data; reward when a reward_model term is configured)
                      │         └─▶ distill                (teacher by config: sft, base, align-*)
    each model (base, sft, align-*, student) ─▶ evaluate-<model>   (benchmarks, data, reward)
      ─▶ candidate (flows) ─▶ quantize (source by config, or the candidate) ─▶ evaluate-quantize-<m>
                           ─▶ distill + evaluate-student, when `distill.teacher: candidate`
      ─▶ report (every evaluate-*: one table, comparisons, charts) ─▶ gate (flows: `champion`)

Wiring only, and no Prefect, MLflow or stage imports: the flow (flows/pipeline.py) runs these
steps as Prefect tasks, and tests, `posttrain rerun --from` and lineage read the same edges.
Modules are named, not imported, so a run that is all cache hits never loads a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import LauncherConfig, PipelineConfig, ReportConfig


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
    model: str | None = None  # the model's name in results and the registry (quantize: one per variant)


def _with_seed(section, seed: int):
    return section if section.seed is not None else section.model_copy(update={"seed": seed})


def plan(cfg: PipelineConfig, candidate: str | None = None) -> list[Step]:
    """The run's steps. With `quantize.source: candidate` or `distill.teacher: candidate` and no
    `candidate` yet, the steps up to the per-model evaluations (without the student's, when the
    candidate teaches it); with it, every step."""
    instruction = (DatasetRef("instruction-train", "data", "instruction/train.jsonl", "training"),)
    preference = (DatasetRef("preference-train", "data", "preference/train.jsonl", "training"),)
    steps = [
        Step("base", "tasks.base", _with_seed(cfg.model, cfg.seed), log_model=True, model="base"),
        Step("benchmarks", "tasks.benchmarks", cfg.benchmarks),
        Step("data", "tasks.data", cfg.data, {"base": "base", "benchmarks": "benchmarks"}),
        Step("sft", "tasks.sft", _with_seed(cfg.sft, cfg.seed), {"base": "base", "data": "data"}, cfg.sft.launcher, instruction, True, "sft"),
        Step(
            "reward", "tasks.reward", _with_seed(cfg.reward, cfg.seed), {"init": cfg.reward.init_from, "data": "data"},
            cfg.reward.launcher, preference, True,
        ),
    ]
    # Each align method is its own branch from the same SFT model, with only the inputs it reads, so
    # a change to one method's section (or to the reward model, for DPO) leaves the others cached.
    prompts = (DatasetRef("prompt-train", "data", "prompt/train.jsonl", "training"),)
    aligned = []
    if "dpo" in cfg.align.methods:
        dpo = _with_seed(cfg.align.dpo, cfg.seed)
        steps.append(Step("align-dpo", "tasks.align.dpo", dpo, {"sft": "sft", "data": "data"}, dpo.launcher, preference, True, "align-dpo"))
        aligned.append("align-dpo")
    if "ppo" in cfg.align.methods:
        ppo = _with_seed(cfg.align.ppo, cfg.seed)
        # The reward model is an input only where PPO reads it: its critic, or a reward_model term.
        reads_reward = ppo.critic_init == "reward" or any(term.name == "reward_model" for term in ppo.rewards)
        ppo_inputs = {"sft": "sft", **({"reward": "reward"} if reads_reward else {}), "data": "data"}
        steps.append(Step("align-ppo", "tasks.align.ppo", ppo, ppo_inputs, ppo.launcher, prompts, True, "align-ppo"))
        aligned.append("align-ppo")
    if "grpo" in cfg.align.methods:
        grpo = _with_seed(cfg.align.grpo, cfg.seed)
        learned = any(term.name == "reward_model" for term in grpo.rewards)
        grpo_inputs = {"sft": "sft", "data": "data", **({"reward": "reward"} if learned else {})}
        steps.append(Step("align-grpo", "tasks.align.grpo", grpo, grpo_inputs, grpo.launcher, prompts, True, "align-grpo"))
        aligned.append("align-grpo")
    # Each model is scored by its own stage, so one changed branch re-scores only itself.
    models = {"base": "base", "sft": "sft", **{name: name for name in aligned}}

    def distill(teacher: str) -> Step:
        section = _with_seed(cfg.distill, cfg.seed)
        return Step("distill", "tasks.distill", section, {"teacher": teacher, "data": "data"}, section.launcher, instruction, True, "student")

    if cfg.distill.teacher != "candidate":
        steps.append(distill(cfg.distill.teacher))  # sft, base and align-* are both the model and its stage
        models["student"] = "distill"
    evaluate = _with_seed(cfg.evaluate, cfg.seed)
    benchmark_files = tuple(DatasetRef(f"{name}-benchmark", "benchmarks", f"{name}.jsonl", "evaluation") for name in cfg.benchmarks.tasks)
    scoring = {"benchmarks": "benchmarks", "data": "data", "reward": "reward"}
    for model, stage in models.items():
        steps.append(Step(f"evaluate-{model}", "tasks.evaluate", evaluate, {**scoring, "model": stage}, datasets=benchmark_files))
    if needs_candidate(cfg) and candidate is None:
        return steps  # the flow picks the candidate from the evaluations above, then asks again
    # The candidate is chosen among the models scored so far; a student it teaches comes after it,
    # so the report may not pick that student (the gate's candidate stays the teacher's model).
    eligible = cfg.gate.eligible
    if cfg.distill.teacher == "candidate":
        eligible = eligible or [model for model in models if model != "base"]
        steps.append(distill(models[candidate]))
        models["student"] = "distill"
        steps.append(Step("evaluate-student", "tasks.evaluate", evaluate, {**scoring, "model": "distill"}, datasets=benchmark_files))
    source = {"student": "distill"}.get(cfg.quantize.source, cfg.quantize.source)
    if cfg.quantize.source == "candidate":
        source = models[candidate]
    steps.append(Step("quantize", "tasks.quantize", cfg.quantize, {"source": source, "data": "data"}, log_model=True, model="quantize"))
    for method in cfg.quantize.methods:
        variant = evaluate.model_copy(update={"variant": method})
        steps.append(Step(f"evaluate-quantize-{method}", "tasks.evaluate", variant, {**scoring, "model": "quantize"}, datasets=benchmark_files))
        models[f"quantize-{method}"] = "quantize"
    report = ReportConfig(
        aligned=aligned,
        target_tasks=cfg.align.target_skills,
        base_is_random=cfg.model.name_or_path is None,
        candidate=cfg.gate.candidate,
        eligible=eligible,
        primary_metric=cfg.gate.primary_metric,
        ks=cfg.evaluate.ks,
    )
    steps.append(Step("report", "tasks.report", report, {"benchmarks": "benchmarks", "reward": "reward", **{m: f"evaluate-{m}" for m in models}}))
    return steps


def needs_candidate(cfg: PipelineConfig) -> bool:
    """Whether some steps wait for the gate's candidate (`quantize.source` or `distill.teacher`)."""
    return cfg.quantize.source == "candidate" or cfg.distill.teacher == "candidate"


def downstream(steps: list[Step], start: str) -> list[str]:
    """`start` and every step that depends on it, directly or not, in plan order."""
    affected = {start}
    for step in steps:
        if set(step.inputs.values()) & affected:
            affected.add(step.name)
    return [step.name for step in steps if step.name in affected]


def upstream(steps: list[Step], stop: str) -> list[str]:
    """`stop` and every step it depends on, directly or not, in plan order (`posttrain run --until`)."""
    by_name = {step.name: step for step in steps}
    needed, pending = set(), [stop]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(by_name[name].inputs.values())
    return [step.name for step in steps if step.name in needed]
