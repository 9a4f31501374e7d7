"""posttrain.dag: steps start when their inputs are done, independent ones overlap, a failure stops new starts."""

import contextvars
import threading
import time

import pytest

from posttrain.dag import run_when_ready

# name -> the names it needs (the demo's shape: two branches from sft, an evaluation of each)
PLAN = {"base": set(), "sft": {"base"}, "dpo": {"sft"}, "ppo": {"sft"}, "eval-dpo": {"dpo"}, "eval-ppo": {"ppo"}, "report": {"eval-dpo", "eval-ppo"}}


def run(work, at_once: int, plan: dict = PLAN) -> None:
    run_when_ready(list(plan), lambda step: plan[step], lambda step: step, work, at_once)


def test_one_at_a_time_is_the_list_order():
    seen = []
    run(seen.append, at_once=1)
    assert seen == list(PLAN)


@pytest.mark.parametrize("at_once", [2, 4])
def test_a_step_starts_only_after_everything_it_needs_has_finished(at_once):
    events, lock = [], threading.Lock()

    def work(step):
        with lock:
            events.append(("start", step))
        time.sleep(0.02)
        with lock:
            events.append(("end", step))

    run(work, at_once)
    position = {event: index for index, event in enumerate(events)}
    assert {step for kind, step in events if kind == "end"} == set(PLAN)
    for step, needs in PLAN.items():
        for need in needs:
            assert position[("end", need)] < position[("start", step)], (need, step)


def test_independent_steps_run_at_the_same_time():
    # Both branches wait for each other: only possible if they are in flight together.
    both = threading.Barrier(2, timeout=5)

    def work(step):
        if step in ("dpo", "ppo"):
            both.wait()

    run(work, at_once=4)


def test_never_more_than_at_once_in_flight():
    wide = {f"eval-{i}": set() for i in range(8)}
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(step):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.02)
        with lock:
            in_flight -= 1

    run(work, at_once=3, plan=wide)
    assert peak == 3


def test_a_failure_stops_new_starts_lets_running_steps_finish_and_is_raised():
    started, finished = [], []

    def work(step):
        started.append(step)
        if step == "dpo":
            raise ValueError("dpo: bad pairs")
        time.sleep(0.05 if step == "ppo" else 0)
        finished.append(step)

    with pytest.raises(ValueError, match="dpo: bad pairs"):
        run(work, at_once=4)
    assert "ppo" in finished  # in flight when dpo failed: it finished
    assert not {"eval-dpo", "eval-ppo", "report"} & set(started)  # nothing new started after the failure


def test_the_callers_context_is_seen_by_every_step():
    flow_run = contextvars.ContextVar("flow_run", default=None)
    flow_run.set("flow-1")
    seen = []
    run(lambda step: seen.append(flow_run.get()), at_once=4)
    assert seen == ["flow-1"] * len(PLAN)
