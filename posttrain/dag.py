"""Run the steps of a plan as their inputs become ready, several at once.

    run_when_ready(steps, needs=lambda s: set(s.inputs.values()), name=lambda s: s.name, work=run.stage, at_once=4)

The pipeline's stages form a DAG: the align branches and distillation each need only sft (and
the data), the evaluations each need one model. A step starts once every step it needs (among
those given) has finished; among the steps ready at the same moment, the one earlier in the list
starts first. With `at_once` 1 this is the plain loop over the list, in its order. On the first
failure no new step starts, the running ones finish, and that failure is raised.

What may overlap is the caller's business: posttrain's flow lets cache hits (their MLflow logging)
and stages on Prefect workers overlap, and builds one local stage at a time (flows/pipeline.py).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Step = TypeVar("Step")


def run_when_ready(
    steps: Sequence[Step], needs: Callable[[Step], set[Hashable]], name: Callable[[Step], Hashable], work: Callable[[Step], object], at_once: int
) -> None:
    if at_once <= 1:
        for step in steps:
            work(step)
        return
    names = {name(step) for step in steps}
    # Needs outside the list were met before (an earlier phase of the run) and are not waited for.
    waiting = {name(step): needs(step) & names for step in steps}
    pending = list(steps)
    done: set[Hashable] = set()
    finished: queue.Queue = queue.Queue()
    running = 0
    failure: BaseException | None = None

    def start(step: Step) -> None:
        in_background(f"stage-{name(step)}", lambda: work(step), lambda error: finished.put((name(step), error)))

    while pending or running:
        if failure is None:
            for step in [s for s in pending if waiting[name(s)] <= done][: at_once - running]:
                pending.remove(step)
                start(step)
                running += 1
        if not running:
            break  # a failure stopped new starts, or what is left waits on a step that never ran
        step_name, error = finished.get()
        running -= 1
        if error is not None:
            failure = failure or error
        else:
            done.add(step_name)
    if failure is not None:
        raise failure
    if pending:  # cannot happen for a plan: its steps only need earlier ones
        raise RuntimeError(f"steps never ready (a cycle in their inputs?): {[name(step) for step in pending]}")


def in_background(label: str, work: Callable[[], object], done: Callable[[BaseException | None], None]) -> threading.Thread:
    """`work()` on a daemon thread, in a copy of the caller's context (Prefect finds its flow run
    there), then `done(None)` or `done(the exception)`: the caller's thread decides what to raise.
    A daemon thread, so Ctrl-C in the main thread ends the process without waiting for it."""
    context = contextvars.copy_context()

    def body() -> None:
        try:
            context.run(work)
        except BaseException as exc:
            done(exc)
        else:
            done(None)

    thread = threading.Thread(target=body, name=label, daemon=True)
    thread.start()
    return thread
