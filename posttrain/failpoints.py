"""Named points where a test makes the process die the way a crash would, at a moment it chooses.

    failpoints.reach("save")                  # does nothing unless POSTTRAIN_FAILPOINT names this point

`POSTTRAIN_FAILPOINT=<stage>:<point>[@<n>][:<action>]` acts the n-th time (default the first) that
`<stage>` reaches `<point>`; the action is `kill` (SIGKILL to this process: no handler, no
`finally`, no flush, exactly a `kill -9`) or `enospc` (the write fails as on a full disk). The stage
is the one being built (`POSTTRAIN_STAGE`, set by posttrain.runner), or the one a caller names.

The points, each where a crash has cost other trainers their work:
    data:phase        between two phases of the data stage (ingest, dedup, contracts, splits)
    <stage>:train-step  inside a training step: gradients computed, weights not yet updated
    <stage>:save      inside a model save: the weights written, the tokenizer not yet
    <stage>:published the stage published to the store, its MLflow logging not yet done
    evaluate-*:generate  between two generation batches of an evaluation

Unset, `reach` is one dictionary lookup, so the points can stay in production code paths.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "POSTTRAIN_FAILPOINT"
_reached: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, str]:
    action = "kill"
    if spec.rsplit(":", 1)[-1] in ("kill", "enospc"):
        spec, action = spec.rsplit(":", 1)
    where, _, count = spec.partition("@")
    return where, int(count or 1), action


def reach(point: str, stage: str | None = None, path: str = "") -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, nth, action = _parse(spec)
    here = f"{stage or os.environ.get('POSTTRAIN_STAGE', '')}:{point}"
    if here != where:
        return
    _reached[here] = _reached.get(here, 0) + 1
    if _reached[here] != nth:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    os.kill(os.getpid(), signal.SIGKILL)
