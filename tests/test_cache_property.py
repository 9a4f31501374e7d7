"""The cache key as a property: from a finished run, one edit at a time, a re-run rebuilds exactly
the stages the edit reaches — no stale hit, no needless rebuild.

The expected set comes from an oracle that never reads the key code (tests/cache_oracle.py): what
each stage imported, opened and ran while it was observed once, the config sections flows/plan.py
hands each stage, and the DAG's edges with the content digests the re-run actually produced:

    rebuilt(stage) must hold  ⟺  the edit touches what the stage used
                                  or an input artifact's digest differs from the finished run's

A stage the edit touched may still come from cache if it provably makes the same bytes: then the
test rebuilds it from scratch in an empty store and compares digests (how a launcher or a batching
knob is allowed to stay out of the key). Edits: bytes and rows of a source file, a value in every
config section, a code edit to every project module (in a copy of the project that the key reads),
a comment-only edit, every contract suite, library versions and Python's. Stages run in-process
through posttrain.runner.execute_stage on a tiny smoke config (a few seconds per full chain).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flows.plan import plan
from posttrain import closure, skills
from posttrain.artifacts import Store
from posttrain.config import load_config
from posttrain.jsonl import write_jsonl
from posttrain.runner import execute_stage
from tests.cache_oracle import libraries_of, observe_stage

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("posttrain", "tasks", "flows", "data_contracts")
# Libraries the code imports only on branches this config does not take (a JSON-array or Parquet
# source, the datasketch dedup backend, a `datasets` folder, LoRA/QLoRA): the key includes them
# because the source does; the run never imports them. For these the test asserts "rebuilt", the
# safe direction, instead of "not rebuilt".
UNTAKEN_BRANCH_IMPORTS = {"data": {"datasets", "datasketch", "ijson", "pyarrow"}, "sft": {"peft", "bitsandbytes"}, "reward": {"peft"}}
SHARDS = 2
LIBRARIES = (
    "torch", "transformers", "trl", "tokenizers", "safetensors", "accelerate", "numpy", "pandas", "pyarrow",
    "great-expectations", "datasets", "pydantic", "pyyaml", "bitsandbytes", "peft", "datasketch", "ijson", "matplotlib",
)


def tiny_overrides(source: Path) -> list[str]:
    return [
        "data.sources=[{role: instruction, generate: {rows: 300}}, "
        f"{{path: {source}, format: instruction}}, "
        "{role: preference, generate: {rows: 120}}, {role: prompt, generate: {rows: 30}}]",
        "sft.max_steps=2", "sft.batch_size=8", "sft.eval_rows=8", "reward.max_steps=2", "reward.batch_size=4",
        "align.dpo.max_steps=2", "align.dpo.batch_size=4", "align.dpo.replay_weight=0.5",
        "align.ppo.max_steps=1", "align.ppo.prompts_per_step=4", "align.grpo.max_steps=1", "align.grpo.prompts_per_step=2", "align.grpo.group_size=2",
        # a learned term too, so GRPO's reward-model branch (and its reward input) is taken and observed
        "align.grpo.rewards=[{name: exact_match}, {name: reward_model, weight: 0.1}]",
        "distill.max_steps=2", "distill.batch_size=8",
        "quantize.eval_rows=8", "quantize.methods=[nf4]", "benchmarks.items=2", "benchmarks.calibration_items=2",
        "evaluate.max_new_tokens=4", "evaluate.samples=2", "evaluate.sample_items=4", "evaluate.ks=[1, 2]", "evaluate.loss_rows=8",
    ]


def run_dag(cfg, store: Store) -> dict[str, dict]:
    artifacts, outcome = {}, {}
    for step in plan(cfg):
        inputs = {name: artifacts[source] for name, source in step.inputs.items()}
        result = execute_stage(step.name, step.module, step.section, inputs, store, cfg.seed, step.launcher, cfg.runtime.threads, cfg.runtime.device)
        artifacts[step.name] = result.artifact
        outcome[step.name] = {
            "built": not result.cache_hit,
            "digest": result.artifact.digest,
            "inputs": {name: artifact.digest for name, artifact in inputs.items()},
            "artifact": result.artifact,
            "step_inputs": inputs,
        }
    return outcome


def section_dumps(cfg) -> dict[str, object]:
    def dump(section):
        return {k: v.model_dump(mode="json") for k, v in section.items()} if isinstance(section, dict) else section.model_dump(mode="json")

    return {step.name: (dump(step.section), step.module, dict(step.inputs)) for step in plan(cfg)}


class World:
    """The copied project, the source file, the finished run and what each stage was seen to use."""

    def __init__(self, tmp: Path):
        self.project = tmp / "project"
        for package in PACKAGES:
            shutil.copytree(REPO / package, self.project / package, ignore=shutil.ignore_patterns("__pycache__"))
        self.source = tmp / "extra.jsonl"
        rows, _ = skills.generate_rows("instruction", rows=60, seed=7)
        write_jsonl(self.source, [{"prompt": row["prompt"], "response": row["response"]} for row in rows])
        self.store = Store(tmp / "root")
        self.scratch = tmp / "scratch"
        self.cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(self.source))
        self.baseline = run_dag(self.cfg, self.store)
        self.used = {}
        for step in plan(self.cfg):
            seen = observe_stage(step.module, step.section, self.baseline[step.name]["step_inputs"], tmp / "observed" / step.name)
            files = {str(Path(f).relative_to(REPO)) for f in seen.files if f.startswith(f"{REPO}/") and not f.endswith((".py", ".pyc"))}
            if str(self.source.resolve()) in seen.files:
                files.add("source")
            self.used[step.name] = {"modules": seen.modules, "files": files, "libraries": seen.libraries}

    def expected(self, cfg, outcome: dict, touched: set[str]) -> set[str]:
        """Stages the edit touches, plus every stage whose input digests differ in this re-run
        (`cfg`: the edited config, whose plan may name stages the finished run did not have)."""
        expected = set()
        for step in plan(cfg):
            changed_input = outcome[step.name]["inputs"] != self.baseline[step.name]["inputs"] if step.name in self.baseline else True
            if step.name in touched or changed_input:
                expected.add(step.name)
        return expected


def module_files(project: Path) -> list[Path]:
    return sorted(path for package in PACKAGES for path in (project / package).rglob("*.py"))


def module_name(project: Path, path: Path) -> str:
    relative = path.relative_to(project).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def build_edits(world: World) -> list[tuple[str, callable]]:
    """Every edit as (label, apply); apply() makes the edit and returns (config, touched stages, revert)."""
    real_versions = closure.installed_versions()
    real_python = closure.python_version
    edits: list[tuple[str, callable]] = []

    # --- outside sources: a byte flipped (same size), rows appended
    def source_edit(change):
        def apply():
            original = world.source.read_bytes()
            world.source.write_bytes(change(original))
            touched = {stage for stage, used in world.used.items() if "source" in used["files"]}
            return world.cfg, touched, lambda: world.source.write_bytes(original)

        return apply

    def flip(data: bytes) -> bytes:  # the first letter of the last answer, same size
        at = data.rindex(b'"response": "') + len(b'"response": "')
        return data[:at] + (b"x" if data[at : at + 1] != b"x" else b"y") + data[at + 1 :]

    edits.append(("source: one byte flipped", source_edit(flip)))
    edits.append(("source: rows appended", source_edit(lambda data: data + b'{"prompt": "copy zzz", "response": "zzz"}\n')))

    # --- a value in each config section (and the top-level seed), and knobs that must not matter
    def config_edit(*overrides):
        def apply():
            cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(world.source) + list(overrides))
            before, after = section_dumps(world.cfg), section_dumps(cfg)
            touched = {stage for stage in after if before.get(stage) != after[stage]}
            return cfg, touched, lambda: None

        return apply

    for override in (
        "seed=1", "model.tiny.intermediate_size=128", "benchmarks.items=3", "data.eval_fraction=0.2",
        "data.near_dup.threshold=0.7", "data.max_tokens=64", "sft.lr=1e-3", "sft.max_length=64", "reward.lr=5e-4",
        "align.dpo.beta=0.3", "align.ppo.kl_beta=0.1", "align.grpo.temperature=0.8", "distill.temperature=1.0", "distill.teacher=base", "quantize.eval_rows=4",
        "quantize.methods=[int8]", "evaluate.max_new_tokens=5", "evaluate.temperature=0.7", "align.target_skills=[sort]",
        "data.batch_rows=50", "sft.launcher.kind=subprocess", "sft.checkpoint_every=3", "reward.checkpoint_every=0", "runtime.threads=2", "tracking.log_models=false",
    ):
        edits.append((f"config: {override}", config_edit(override)))

    # --- a code edit to every project module, and a comment-only edit to two shared ones
    def module_edit(path: Path, addition: str, behaves: bool):
        def apply():
            original = path.read_text()
            path.write_text(original + addition)
            name = module_name(world.project, path)
            touched = {stage for stage, used in world.used.items() if name in used["modules"]} if behaves else set()
            return world.cfg, touched, lambda: path.write_text(original)

        return apply

    for number, path in enumerate(module_files(world.project)):
        edits.append((f"code: {path.relative_to(world.project)}", module_edit(path, f"\n_cache_probe = {number}\n", True)))
    for relative in ("posttrain/formatting.py", "posttrain/models.py"):
        edits.append((f"comment: {relative}", module_edit(world.project / relative, "\n# a comment changes no behaviour\n", False)))

    # --- every contract suite (bytes of a declared data file)
    def file_edit(relative: str):
        def apply():
            path = world.project / relative
            original = path.read_text()
            path.write_text(original.replace('"meta": {', '"meta": {"edited": true, ', 1))
            touched = {stage for stage, used in world.used.items() if relative in used["files"]}
            return world.cfg, touched, lambda: path.write_text(original)

        return apply

    for suite in sorted((world.project / "data_contracts").glob("*.json")):
        edits.append((f"contract: {suite.name}", file_edit(f"data_contracts/{suite.name}")))

    # --- a recorded library version, and Python's
    def restore_versions():
        closure.installed_versions = lambda: real_versions

    def library_edit(distribution: str):
        def apply():
            closure.installed_versions = lambda: {**real_versions, distribution: "999.0"}
            touched = {stage for stage, used in world.used.items() if distribution in used["libraries"]}
            return world.cfg, touched, restore_versions

        return apply

    for distribution in LIBRARIES:
        edits.append((f"library: {distribution}", library_edit(distribution)))

    def python_edit():
        closure.python_version = lambda: "cpython-3.99.0"
        return world.cfg, set(world.used), lambda: setattr(closure, "python_version", real_python)

    edits.append(("python version", python_edit))
    random.Random(0).shuffle(edits)
    return edits


def check_shard(tmp: Path, shard: int, shards: int) -> dict:
    """Build the world in `tmp`, apply every `shards`-th edit from `shard`; the failures and timings."""
    closure.PROJECT_ROOT = (tmp / "project").resolve()  # a worker process of its own: nothing to restore
    world = World(tmp)
    assert {stage for stage, info in world.baseline.items() if info["built"]} == set(world.baseline)
    edits = build_edits(world)
    allowed_extra = {stage: libraries_of(names) - world.used[stage]["libraries"] for stage, names in UNTAKEN_BRANCH_IMPORTS.items()}
    failures, seconds, rebuilt_by_edit = [], {}, {}
    for label, apply in edits[shard::shards]:
        clock = time.perf_counter()
        cfg, touched, revert = apply()
        try:
            outcome = run_dag(cfg, world.store)
        finally:
            revert()
        rebuilt = {stage for stage, info in outcome.items() if info["built"]}
        expected = world.expected(cfg, outcome, touched)
        if label.startswith("library: "):
            distribution = label.removeprefix("library: ")
            expected |= {stage for stage, extra in allowed_extra.items() if distribution in extra} & rebuilt
        # A config knob may stay out of the key only if it provably makes the same bytes: a touched
        # stage served from cache is rebuilt from scratch in an empty store and compared. (Code,
        # files and versions get no such pass: the probe edits do not change behaviour, so a
        # rebuild would always match and the check could not fail.)
        for stage in sorted(expected - rebuilt) if label.startswith("config: ") else ():
            step = next(step for step in plan(cfg) if step.name == stage)
            scratch = Store(world.scratch / f"{len(seconds)}-{stage}")
            fresh = execute_stage(stage, step.module, step.section, outcome[stage]["step_inputs"], scratch, cfg.seed, step.launcher)
            if fresh.artifact.digest == outcome[stage]["digest"]:
                expected.discard(stage)
        if rebuilt != expected:
            failures.append(f"{label}: rebuilt {sorted(rebuilt)}, expected {sorted(expected)}")
        seconds[label] = round(time.perf_counter() - clock, 1)
        rebuilt_by_edit[label] = sorted(rebuilt)
    return {"edits": len(edits), "failures": failures, "seconds": seconds, "rebuilt": rebuilt_by_edit}


@pytest.mark.slow
def test_every_edit_rebuilds_exactly_what_it_reaches(tmp_path):
    # Two worker processes (the CI box has two cores), each with its own copy of the project and
    # store, take every other edit.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=SHARDS, mp_context=context) as pool:
        futures = [pool.submit(check_shard, tmp_path / f"shard{shard}", shard, SHARDS) for shard in range(SHARDS)]
        results = [future.result() for future in futures]
    assert results[0]["edits"] >= 50
    assert sum(len(result["seconds"]) for result in results) == results[0]["edits"]
    failures = [failure for result in results for failure in result["failures"]]
    report = os.environ.get("POSTTRAIN_PROPERTY_REPORT")  # docs/reliability.md's table comes from here
    if report:
        rows = sorted(
            f"| {label} | {', '.join(stages) or '—'} | {result['seconds'][label]} |"
            for result in results
            for label, stages in result["rebuilt"].items()
        )
        Path(report).write_text("\n".join(["| edit | rebuilt (= expected) | seconds |", "|---|---|---:|", *rows]) + "\n")
    assert not failures, "\n".join(failures)
