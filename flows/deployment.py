"""The flow a Prefect deployment runs: a recorded pipeline run of a config file, as `posttrain run` does.

    posttrain schedule configs/demo.yaml --cron "0 3 * * 1" --pool posttrain   # the deployment
    posttrain worker --pool posttrain                                          # runs what is due

Each scheduled run gets its own run record and MLflow parent run. Unchanged sources and config make
every stage a cache hit: the run says "nothing changed" and costs seconds. A new or edited source
file rebuilds data and everything downstream, and the new candidate goes through the gate, so the
champion moves only when it is better. A failure and a promotion are sent to the webhook in
POSTTRAIN_WEBHOOK_URL (posttrain.notify).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, get_run_logger

from flows.pipeline import pipeline
from posttrain import notify, watchdog
from posttrain.config import load_config
from posttrain.runs import RunRecord, mark_dead_runs_failed


@flow(name="posttrain-scheduled", persist_result=False)
def scheduled_pipeline(config_path: str, overrides: list[str] | None = None) -> dict:
    logger = get_run_logger()
    overrides = list(overrides or [])
    record = None
    try:
        cfg = load_config(config_path, overrides)
        cfg.check_outside_paths(config_path)
        root = Path(cfg.store_root).resolve()
        config_text = Path(config_path).read_text() + "".join(f"\n# --set {item}" for item in overrides)
        record = RunRecord.start(root, cfg, config_path, overrides, config_text)
        record.update(trigger="deployment")
        watchdog.start(record.path)
        mark_dead_runs_failed(root)
        final = pipeline(cfg, str(record.path), config_text)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logging.getLogger("posttrain").error("scheduled run failed: %s", first_line)
        data = {"run_id": None, "run_name": Path(config_path).stem}
        if record is not None:
            latest = RunRecord.load(record.path)
            if latest.data.get("status") == "running":
                latest.mark_failed(first_line)
            data = latest.data
        notify.after_run(data, first_line)
        raise
    built = [name for name, info in final["stages"].items() if not info.get("cache_hit")]
    RunRecord.load(record.path).update(changed=bool(built))
    if built:
        logger.info("run %s rebuilt %d of %d stages: %s", final["run_id"], len(built), len(final["stages"]), ", ".join(built))
    else:
        logger.info("run %s: nothing changed; all %d stages from cache", final["run_id"], len(final["stages"]))
    notify.after_run(final)
    gate = final.get("gate") or {}
    return {"run_id": final["run_id"], "changed": bool(built), "built": built, "gate": gate.get("decision"), "candidate": gate.get("candidate")}
