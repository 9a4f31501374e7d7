"""A flow entry point for Prefect deployments: takes a config path and overrides as parameters.

`infra/prefect.yaml` schedules it (weekly retraining). Unchanged data and config make every stage
a cache hit, so a scheduled run costs only what changed since the last one.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline
from posttrain.config import load_config


@flow(name="posttrain-scheduled")
def scheduled_pipeline(config_path: str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(config_path, overrides or [])
    config_yaml = Path(config_path).read_text()
    return pipeline(cfg, config_path, config_yaml)
