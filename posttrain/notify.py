"""Notifications for the events a team watches: a run failed, a model was promoted to champion.

    notify("promoted", {"run_id": ..., "model": "align-ppo", "version": "3", "reason": "..."})

Sent as one JSON POST to the webhook URL in POSTTRAIN_WEBHOOK_URL (Slack-style incoming webhooks,
an alerting gateway, a Prefect automation's webhook); nothing is sent when it is unset. The URL
often carries a token, so it is read from the environment only and never logged or recorded. A
notification that cannot be delivered is a warning in the run's log, never a failed run.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request

WEBHOOK_ENV = "POSTTRAIN_WEBHOOK_URL"
log = logging.getLogger("posttrain.notify")


def notify(event: str, payload: dict, timeout: float = 10.0) -> bool:
    """POST {"event": event, "text": a one-line summary, **payload}; True when the receiver took it."""
    url = os.environ.get(WEBHOOK_ENV)
    if not url:
        return False
    summary = {
        "failed": f"posttrain run {payload.get('run_id')} failed: {payload.get('error')}",
        "promoted": f"posttrain run {payload.get('run_id')} promoted {payload.get('model')} (v{payload.get('version')}) to champion: {payload.get('reason')}",
    }.get(event, f"posttrain {event}")
    body = json.dumps({"event": event, "text": summary, **payload}, default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError) as exc:
        log.warning("the %s notification was not delivered (%s)", event, type(exc).__name__)
        return False


def after_run(record: dict, error: str | None = None) -> None:
    """The notifications a finished run owes: `failed` with its error, or `promoted` when the gate
    moved the champion to its candidate."""
    if error is not None or record.get("status") == "failed":
        notify("failed", {"run_id": record.get("run_id"), "run_name": record.get("run_name"), "error": error or record.get("error")})
        return
    gate = record.get("gate") or {}
    if gate.get("decision") == "promoted":
        notify("promoted", {
            "run_id": record.get("run_id"), "run_name": record.get("run_name"), "model": gate.get("candidate"),
            "version": gate.get("version"), "score": gate.get("candidate_score"), "reason": gate.get("reason"),
        })
