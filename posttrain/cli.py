"""Command line: `posttrain run CONFIG [--set key=value ...]` and `posttrain status [RUN]`.

    posttrain run configs/demo.yaml
    posttrain run configs/demo.yaml --set evaluate.max_new_tokens=16   # re-runs only evaluate
    posttrain status                       # the latest run under ./artifacts
    posttrain status demo --root artifacts

Errors at the edge (bad config, bad data, a failed contract, a model that cannot be loaded) print
one line and exit non-zero; the full trace goes to <store_root>/logs/<run>.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.config import ConfigError, load_config
from posttrain.env import configure_environment

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# The figures shown per stage in the summary and in `status` (all metrics are in the manifest/MLflow).
KEY_METRICS = {
    "base": ["parameters"],
    "benchmarks": ["skills_items"],
    "data": ["rows_in", "rows_out", "removed_exact_dup", "removed_near_dup", "removed_decontaminated"],
    "sft": ["eval_loss_before", "eval_loss", "tokens_per_second"],
    "reward": ["eval_before_accuracy", "eval_accuracy", "tokens_per_second"],
    "align-dpo": ["eval_before_implicit_reward_accuracy", "eval_implicit_reward_accuracy", "tokens_per_second"],
    "distill": ["student_parameters", "student_eval_loss", "teacher_eval_loss", "agreement"],
    "quantize": ["nf4_size_ratio", "nf4_loss_delta", "int8_size_ratio", "int8_loss_delta"],
    "evaluate": [],
}


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _key_metrics(stage: str, metrics: dict) -> str:
    names = KEY_METRICS.get(stage, [])
    return "  ".join(f"{name}={_format_value(metrics[name])}" for name in names if name in metrics)


def print_stage_table(record: dict) -> None:
    table = Table(title=f"run {record['run_name']} — {record['status']}")
    for column in ("stage", "state", "cache", "seconds", "key metrics"):
        table.add_column(column)
    for stage, info in record["stages"].items():
        cache = "hit" if info.get("cache_hit") else ("miss" if "cache_hit" in info else "")
        seconds = f"{info['seconds']:.1f}" if "seconds" in info else ""
        detail = info.get("error") or _key_metrics(stage, info.get("metrics", {}))
        table.add_row(stage, info["state"], cache, seconds, detail)
    console.print(table)


def print_results_table(evaluate_dir: Path) -> None:
    results = json.loads((evaluate_dir / "results.json").read_text())
    for bench_name in next(iter(results.values()))["scores"]:
        if bench_name == "seconds":
            continue
        columns = list(next(iter(results.values()))["scores"][bench_name])
        table = Table(title=f"{bench_name}: held-out exact match (%)")
        table.add_column("model")
        for column in columns:
            table.add_column(column, justify="right")
        for model_name, row in results.items():
            table.add_row(model_name, *(f"{100 * row['scores'][bench_name][c]:.1f}" for c in columns))
        console.print(table)


def _setup_log(root: Path, run_name: str) -> Path:
    log_path = root / "logs" / f"{run_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.captureWarnings(True)
    return log_path


def _prepare_environment(root: Path) -> None:
    configure_environment()
    # Prefect keeps its database and persisted task results under the store root by default, so a
    # store folder is self-contained (and tests in temporary folders don't share state).
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(root / "prefect" / "results"))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")


def command_run(args) -> int:
    cfg = load_config(args.config, args.set)
    root = Path(cfg.store_root).resolve()
    _prepare_environment(root)
    log_path = _setup_log(root, cfg.run_name)
    config_yaml = Path(args.config).read_text() + "".join(f"\n# --set {item}" for item in args.set)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        from flows.pipeline import pipeline

        record = pipeline(cfg, str(args.config), config_yaml)
    except KeyboardInterrupt:
        errors.print("posttrain: interrupted; finished stages are kept in the store")
        return 130
    except Exception as exc:  # the edge: one line to the terminal, the trace to the log
        logging.getLogger("posttrain").error("run failed\n%s", traceback.format_exc())
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        errors.print(f"[red]error:[/] {first_line}  [dim](trace: {log_path})[/]")
        return 1
    print_stage_table(record)
    evaluate_path = record["stages"].get("evaluate", {}).get("path")
    if evaluate_path:
        print_results_table(root / evaluate_path)
    hits = sum(1 for info in record["stages"].values() if info.get("cache_hit"))
    console.print(f"{hits}/{len(record['stages'])} stages from cache. MLflow: mlflow ui --backend-store-uri {cfg.tracking.uri or 'sqlite:///' + str(root / 'mlflow.db')}")
    return 0


def command_status(args) -> int:
    runs_dir = Path(args.root) / "runs"
    if args.run:
        record_path = runs_dir / args.run / "run.json"
    else:
        candidates = sorted(runs_dir.glob("*/run.json"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            errors.print(f"[red]error:[/] no runs under {runs_dir}")
            return 1
        record_path = candidates[-1]
    if not record_path.is_file():
        errors.print(f"[red]error:[/] {record_path}: no such run")
        return 1
    record = json.loads(record_path.read_text())
    print_stage_table(record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the pipeline described by a config file")
    run_parser.add_argument("config")
    run_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. sft.lr=1e-4")
    status_parser = commands.add_parser("status", help="stages, states, cache hits and key metrics of a run")
    status_parser.add_argument("run", nargs="?")
    status_parser.add_argument("--root", default="artifacts", help="the store root (store_root in the config)")
    args = parser.parse_args(argv)
    try:
        return command_run(args) if args.command == "run" else command_status(args)
    except ConfigError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
