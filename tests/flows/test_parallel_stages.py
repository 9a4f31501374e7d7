"""runtime.parallel_stages in the flow: stages sent to workers overlap, stages built in this process
never do, and run.json and the artifacts keep the plan's order. The build and the worker are stand-ins that only
note when they run; everything between them and the scheduler is the flow's own code."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

import flows.pipeline as pipeline
from flows.plan import Step
from posttrain.config import LauncherConfig, load_config
from posttrain.runs import RunRecord

# (name, inputs, on a worker?) — sft, then three branches on a pool's workers and two built here
STEPS = [("sft", {}, False), ("align-dpo", {"sft": "sft"}, True), ("align-ppo", {"sft": "sft"}, True),
         ("distill", {"teacher": "sft"}, False), ("align-grpo", {"sft": "sft"}, False), ("align-kto", {"sft": "sft"}, True)]


class StubTracking:
    child_runs: dict = {}

    def begin_stage_log(self, stage, *args, **kwargs):
        return f"run-{stage}", lambda: None


@pytest.fixture
def flow_run(tmp_path, monkeypatch):
    cfg = load_config("configs/smoke.yaml", [f"store_root={tmp_path}", "runtime.parallel_stages=8"])
    record = RunRecord.start(tmp_path, cfg, "configs/smoke.yaml", [], "")
    run = pipeline.PipelineRun(cfg, record, StubTracking(), "flow-1")
    spans, lock = {}, threading.Lock()

    def busy(name: str, seconds: float = 0.15) -> dict:
        started = time.monotonic()
        time.sleep(seconds)
        with lock:
            spans[name] = (started, time.monotonic())
        return {"path": f"store/{name}/fp", "built_by_flow_run": "flow-1", "store_hit": False, "seconds": seconds}

    monkeypatch.setattr(pipeline, "compute_key", lambda stage, *args: SimpleNamespace(fingerprint=f"fp-{stage}", parts={}))
    monkeypatch.setattr(run.store, "lookup", lambda stage, fingerprint: None)  # nothing is in the store: every stage builds
    monkeypatch.setattr(pipeline.PipelineRun, "_stage_task", lambda self, step, *args: busy(step.name))
    monkeypatch.setattr(pipeline.PipelineRun, "on_worker", lambda self, step, *args: busy(step.name))
    monkeypatch.setattr(pipeline.Artifact, "load", lambda path: SimpleNamespace(path=path, manifest={"path": str(path)}, metrics={}))
    steps = [Step(name, "tasks.sft", cfg.sft, inputs, LauncherConfig(kind="deployment", pool="gpu") if remote else None) for name, inputs, remote in STEPS]
    return run, steps, spans


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_worker_stages_overlap_and_local_builds_take_turns(flow_run):
    run, steps, spans = flow_run
    run.run_steps(steps)
    assert set(spans) == {name for name, _, _ in STEPS}
    remote = [name for name, _, on_worker in STEPS if on_worker]
    local = [name for name, _, on_worker in STEPS if not on_worker]
    assert all(overlap(spans[a], spans[b]) for a in remote for b in remote if a < b), spans  # all three workers at once
    assert not any(overlap(spans[a], spans[b]) for a in local for b in local if a < b), spans  # one local build at a time
    assert all(spans["sft"][1] <= spans[name][0] for name in spans if name != "sft")  # everything waited for its input
    assert list(run.record.data["stages"]) == [name for name, _, _ in STEPS]  # the plan's order in run.json
    finished = sorted(spans, key=lambda name: spans[name][1])
    assert finished != [name for name, _, _ in STEPS]  # the workers' stages finished before the local ones...
    assert list(run.artifacts) == [name for name, _, _ in STEPS]  # ...yet a tie between models goes the plan's way
    assert all(info["state"] == "built" for info in run.record.data["stages"].values())


def test_one_at_a_time_runs_the_plan_in_order(flow_run):
    run, steps, spans = flow_run
    run.cfg.runtime.parallel_stages = 1
    run.run_steps(steps)
    order = sorted(spans, key=lambda name: spans[name][0])
    assert order == [name for name, _, _ in STEPS]
    assert not any(overlap(spans[a], spans[b]) for a in spans for b in spans if a < b)
