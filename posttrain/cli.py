"""Command line: run the pipeline, list and read its runs, verify the store.

    posttrain run configs/demo.yaml
    posttrain run configs/demo.yaml --set evaluate.max_new_tokens=16   # re-runs only evaluate
    posttrain resume RUN                   # continue a failed or killed run; training from its last checkpoint
    posttrain rerun RUN --from sft         # that run's config again, rebuilding sft and everything after it
    posttrain schedule configs/demo.yaml --cron "0 3 * * 1"   # a Prefect deployment (PREFECT_API_URL)
    posttrain worker --pool posttrain      # runs the deployment's due runs
    posttrain lineage champion             # source files -> data -> sft -> ... -> the champion, with MLflow runs
    posttrain gc --dry-run                 # what removing unused store folders would free (gc: remove them)
    posttrain runs                         # every run under ./artifacts, oldest first
    posttrain status                       # the latest run; exits 1 if it failed
    posttrain status demo --json           # the newest run named demo (or a run id), as JSON
    posttrain verify                       # re-hash every artifact in the store against its manifest
    posttrain verify sft                   # ... of one stage, or one folder: verify artifacts/store/sft/<fp>
    posttrain promote demo --model sft     # make that run's sft the registered model's champion, by hand

Errors at the edge (bad config, bad data, a failed contract, a model that cannot be loaded) print
one line and exit non-zero; the full trace goes to <store_root>/logs/<run id>.log.
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

from posttrain import notify, watchdog
from posttrain.config import ConfigError, load_config
from posttrain.env import configure_environment

# Piped output (CI logs, tests) gets 120 columns instead of rich's 80, so tables are not squeezed.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# The figures shown per stage in the summary and in `status` (all metrics are in the manifest/MLflow).
KEY_METRICS = {
    "base": ["parameters"],
    "benchmarks": ["skills_items"],
    "data": ["rows_in", "rows_out", "removed_exact_dup", "removed_near_dup", "removed_decontaminated"],
    "sft": ["eval_loss_before", "eval_loss", "tokens_per_second"],
    "reward": ["eval_before_accuracy", "eval_accuracy", "tokens_per_second"],
    "align-dpo": ["eval_before_implicit_reward_accuracy", "eval_implicit_reward_accuracy", "final_kl", "tokens_per_second"],
    "align-ppo": ["gold_reward_first", "gold_reward_last", "final_kl", "generated_tokens_per_second"],
    "align-grpo": ["gold_reward_first", "gold_reward_last", "final_kl", "zero_variance_fraction"],
    "distill": ["student_parameters", "student_eval_loss", "teacher_eval_loss", "agreement"],
    "quantize": ["nf4_size_ratio", "nf4_loss_delta", "int8_size_ratio", "int8_loss_delta"],
    "report": [],
}
EVALUATE_METRICS = ["mean.exact_match", "mean.ece", "mean.self_consistency_k16", "generation_seconds"]


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _key_metrics(stage: str, metrics: dict) -> str:
    names = EVALUATE_METRICS if stage.startswith("evaluate-") else KEY_METRICS.get(stage, [])
    return "  ".join(f"{name}={_format_value(metrics[name])}" for name in names if name in metrics)


def print_stage_table(record: dict) -> None:
    table = Table(title=f"run {record.get('run_id', record['run_name'])} — {record['status']}")
    for column in ("stage", "state", "cache", "seconds", "key metrics"):
        table.add_column(column)
    for stage, info in record["stages"].items():
        cache = "hit" if info.get("cache_hit") else ("miss" if "cache_hit" in info else "")
        seconds = f"{info['seconds']:.1f}" if "seconds" in info else ""
        detail = info.get("error") or _key_metrics(stage, info.get("metrics", {}))
        table.add_row(stage, info["state"], cache, seconds, detail)
    console.print(table)


def print_results(record: dict, root: Path) -> None:
    """The report's table (models x key metrics), its notes and the gate's decision."""
    from posttrain.report import terminal_table

    if record.get("results"):
        console.print(terminal_table(record["results"]))
    report_path = record["stages"].get("report", {}).get("path")
    if report_path and (root / report_path / "report.json").is_file():
        for note in json.loads((root / report_path / "report.json").read_text())["notes"]:
            console.print(f"[dim]note: {note}[/]")
    gate = record.get("gate")
    if gate:
        champion = f"champion v{gate['champion_version']} {gate['champion_score']:.4f}" if gate.get("champion_score") is not None else "no champion re-scored"
        console.print(f"gate: candidate {gate['candidate']} ({gate['candidate_score']:.4f}) vs {champion}: {gate['decision']} — {gate['reason']}")


def _setup_log(root: Path, run_id: str) -> Path:
    log_path = root / "logs" / f"{run_id}.log"
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


def _start_prefect_server(root: Path) -> None:
    """Prefect's temporary API server, started now rather than by the flow, one process at a time
    per store: its first start migrates the database under store_root/prefect, and two runs
    migrating it at once printed a traceback (`duplicate column name`). With PREFECT_API_URL set,
    the runs use that server and this does nothing."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import fcntl

    from prefect.server.api.server import SubprocessASGIServer

    lock = root / "prefect" / ".server-start.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        SubprocessASGIServer().start()  # the flow's client finds it running (a per-process singleton)


def _check_stage_name(cfg, stage: str, option: str) -> None:
    from flows.plan import plan

    # Any candidate will do: the names of the steps after the gate's choice do not depend on it.
    names = [step.name for step in plan(cfg, candidate=cfg.gate.candidate if cfg.gate.candidate != "best" else "sft")]
    if stage not in names:
        raise ConfigError(f"{option} {stage}: not a stage of this run (stages: {', '.join(names)})")
    if option == "--until" and stage not in {step.name for step in plan(cfg)}:
        raise ConfigError(f"--until {stage}: it is planned after the gate's candidate is chosen (a `candidate` source or teacher); run the whole pipeline")


def command_run(args) -> int:
    from posttrain.runs import RunRecord

    cfg = load_config(args.config, args.set)
    cfg.check_outside_paths(str(args.config))
    if args.until is not None:
        _check_stage_name(cfg, args.until, "--until")
    root = Path(cfg.store_root).resolve()
    _prepare_environment(root)
    config_text = Path(args.config).read_text()
    record = RunRecord.start(root, cfg, str(args.config), args.set, config_text)
    logged_text = config_text + "".join(f"\n# --set {item}" for item in args.set)
    return _run_pipeline(cfg, record, logged_text, args.until)


def _recorded_run(root: Path, run: str) -> tuple[dict, object, str]:
    """A run's record and the config it ran with (resolved, as recorded; its store is `root`)."""
    import yaml

    from posttrain.config import PipelineConfig
    from posttrain.runs import find_run

    record = find_run(root, run)
    if record is None:
        raise ConfigError(f"{run}: no such run under {root / 'runs'}")
    cfg = PipelineConfig.model_validate({**record["config"], "store_root": str(root)})
    return record, cfg, yaml.safe_dump(record["config"], sort_keys=False)


def command_resume(args) -> int:
    """Continue a failed or killed run: same run id and record, same MLflow parent run; finished
    stages come from the store, a training stage from its last checkpoint, the rest is built."""
    from posttrain.runs import RunRecord

    root = Path(args.root).resolve()
    found, cfg, config_text = _recorded_run(root, args.run)
    if found["status"] == "succeeded":
        raise ConfigError(f"{found['run_id']}: succeeded; nothing to resume (posttrain rerun {found['run_id']} --from STAGE rebuilds)")
    if found["status"] == "running":
        raise ConfigError(f"{found['run_id']}: still running (pid {found.get('pid')} on {found.get('host')}); resume a failed or killed run")
    _prepare_environment(root)
    record = RunRecord.load(root / "runs" / found["run_id"] / "run.json")
    record.reopen()
    console.print(f"resuming run {record.run_id} (failed: {record.data['resumes'][-1]['previous_error']})")
    return _run_pipeline(cfg, record, config_text, found.get("until"), resume_parent=found.get("mlflow_parent_run_id"))


def command_rerun(args) -> int:
    """A new run of a recorded run's config that rebuilds STAGE and everything downstream of it,
    keeping what is upstream."""
    from posttrain.runs import RunRecord

    root = Path(args.root).resolve()
    found, cfg, config_text = _recorded_run(root, args.run)
    _check_stage_name(cfg, args.from_stage, "--from")
    _prepare_environment(root)
    record = RunRecord.start(root, cfg, found["config_path"], found.get("overrides", []), config_text)
    record.update(rerun_of=found["run_id"], rerun_from=args.from_stage)
    return _run_pipeline(cfg, record, config_text, found.get("until"), force_from=args.from_stage)


def _run_pipeline(cfg, record, config_text: str, until: str | None, resume_parent: str | None = None, force_from: str | None = None) -> int:
    from posttrain.runs import RunRecord, mark_dead_runs_failed

    root = Path(cfg.store_root).resolve()
    watchdog.start(record.path)  # before anything starts a process: none may outlive this one
    mark_dead_runs_failed(root)
    log_path = _setup_log(root, record.run_id)
    try:
        # No transformers import here: a run that is all cache hits never loads it (its progress
        # bars are off through HF_HUB_DISABLE_PROGRESS_BARS, posttrain.env).
        from flows.pipeline import pipeline

        _start_prefect_server(root)
        final = pipeline(cfg, str(record.path), config_text, until, resume_parent, force_from)
    except KeyboardInterrupt:
        errors.print("posttrain: interrupted; finished stages are kept in the store")
        return 130
    except Exception as exc:  # the edge: one line to the terminal, the trace to the log
        logging.getLogger("posttrain").error("run failed\n%s", traceback.format_exc())
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        latest = RunRecord.load(record.path)  # the flow may have written stages since
        if latest.data.get("status") == "running":  # failed before the flow could say so (e.g. no tracking server)
            latest.mark_failed(first_line)
        notify.after_run(latest.data, first_line)
        errors.print(f"[red]error:[/] {first_line}  [dim](trace: {log_path})[/]")
        return 1
    notify.after_run(final)
    print_stage_table(final)
    print_results(final, root)
    hits = sum(1 for info in final["stages"].values() if info.get("cache_hit"))
    console.print(f"run {final['run_id']}: {hits}/{len(final['stages'])} stages from cache. MLflow: mlflow ui --backend-store-uri {cfg.tracking.uri or 'sqlite:///' + str(root / 'mlflow.db')}")
    return 0


def _prefect_server_url() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise ConfigError("scheduling needs a Prefect server: start one (prefect server start --host 127.0.0.1) and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def command_schedule(args) -> int:
    """A Prefect deployment of flows/deployment.py on a process work pool, on a cron schedule, with
    at most one run at a time (a run still going when the next is due makes that one wait)."""
    cfg = load_config(args.config, args.set)  # refused here, in one line, rather than at 03:00
    cfg.check_outside_paths(str(args.config))
    _prefect_server_url()
    configure_environment()
    from flows.deployment import scheduled_pipeline
    from posttrain.runner import REPO_ROOT

    _ensure_pool(args.pool)
    name = args.name or Path(args.config).stem
    source = scheduled_pipeline.from_source(source=str(REPO_ROOT), entrypoint="flows/deployment.py:scheduled_pipeline")
    deployment_id = source.deploy(
        name=name,
        work_pool_name=args.pool,
        cron=args.cron,
        parameters={"config_path": str(Path(args.config).resolve()), "overrides": list(args.set)},
        concurrency_limit=1,
        build=False,
        push=False,
        print_next_steps=False,
    )
    console.print(f"deployment posttrain-scheduled/{name} ({deployment_id}) on pool {args.pool}, cron {args.cron!r}, one run at a time")
    console.print(f"runs start when a worker serves the pool: posttrain worker --pool {args.pool}")
    return 0


def _ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass


def command_worker(args) -> int:
    """`prefect worker start` on the pool: polls the server and runs each due flow run in its own
    process — scheduled pipelines, and single stages sent here by `launcher.kind: deployment`
    (the deployment posttrain-stage/<pool>, made now). Stages built here are kept in
    POSTTRAIN_WORKER_STORE (default: posttrain-store/ in this folder) and shared through the
    pipeline's shared_store."""
    _prefect_server_url()
    # A worker is a service: its flow runs' INFO lines ("nothing changed", what was rebuilt) are
    # what its operator reads, so it does not take the CLI's quiet WARNING level.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    configure_environment()
    from flows.stage_flow import WORKER_STORE_ENV, stage_flow
    from posttrain.runner import REPO_ROOT

    _ensure_pool(args.pool)
    os.environ[WORKER_STORE_ENV] = str(Path(os.environ.get(WORKER_STORE_ENV, "posttrain-store")).resolve())
    stage_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/stage_flow.py:stage_flow").deploy(
        name=args.pool, work_pool_name=args.pool, build=False, push=False, print_next_steps=False,
    )
    console.print(f"serving pool {args.pool}: scheduled runs, and stages sent to posttrain-stage/{args.pool}; local store {os.environ[WORKER_STORE_ENV]}")
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect) if prefect.exists() else "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.run_once:
        command.append("--run-once")
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 0  # not reached


def command_lineage(args) -> int:
    from posttrain import lineage
    from posttrain.runs import list_runs
    from posttrain.tracking import default_tracking_uri

    root = Path(args.root).resolve()
    records = list_runs(root)
    tracking = records[-1]["config"].get("tracking", {}) if records else {}
    uri = tracking.get("uri") or default_tracking_uri(root)
    registered = tracking.get("registered_model") or (records[-1]["run_name"] if records else None)
    try:
        path = lineage.resolve(root, args.target, tracking.get("uri"), registered)
        chain = lineage.lineage(root, path)
    except lineage.LineageError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return 1
    experiment_id = lineage.attach_mlflow_runs(chain, uri, tracking.get("experiment", "posttrain")) if tracking.get("enabled", True) else None
    if args.json:
        print(json.dumps([{"stage": link.stage, "path": link.path, "mlflow_run": link.mlflow_run, "manifest": {k: v for k, v in link.manifest.items() if k != "files"}} for link in chain], indent=2, default=str))
        return 0
    web = uri.startswith(("http://", "https://"))
    console.print(f"lineage of {path} ({len(chain)} artifacts, sources first)", highlight=False)
    console.print(lineage.render(chain, (lambda run: f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run}") if web else None), highlight=False, markup=False)
    if not web and any(link.mlflow_run for link in chain):
        console.print(f"MLflow runs above: mlflow ui --backend-store-uri {uri} --host 127.0.0.1", markup=False)
    return 0


def command_gc(args) -> int:
    from posttrain import gc
    from posttrain.runs import list_runs

    root = Path(args.root).resolve()
    if not (root / "store").is_dir():
        errors.print(f"[red]error:[/] {root}: no store here (no {root / 'store'})")
        return 1
    # Registered versions live where the runs logged them: the newest run's tracking server, under
    # each registered model name the runs used.
    records = list_runs(root)
    tracking = records[-1]["config"].get("tracking", {}) if records else {}
    registered: dict[str, str] = {}
    if tracking.get("enabled", True):
        for name in sorted({record["config"].get("tracking", {}).get("registered_model") or record["run_name"] for record in records}):
            registered.update(gc.registered_paths(root, tracking.get("uri"), name))
    plan = gc.collect(root, args.keep_runs, registered)
    table = Table(title=f"{'would remove' if args.dry_run else 'removing'} under {root}")
    for column in ("path", "MB", "why"):
        table.add_column(column)
    for removal in plan.removals:
        table.add_row(str(removal.path.relative_to(root)), f"{removal.bytes / 1e6:.2f}", removal.why)
    if plan.removals:
        console.print(table)
    kept = len([path for path in plan.kept if (root / path / "manifest.json").is_file()])
    if args.dry_run:
        console.print(f"would free {plan.bytes / 1e6:.1f} MB in {len(plan.removals)} folders; {kept} published folders kept (--keep-runs {args.keep_runs})")
        return 0
    done = gc.apply(plan)
    console.print(f"freed {sum(removal.bytes for removal in done) / 1e6:.1f} MB in {len(done)} folders; {kept} published folders kept (--keep-runs {args.keep_runs})")
    return 0


def command_runs(args) -> int:
    from posttrain.runs import list_runs

    records = list_runs(Path(args.root))
    if not records:
        errors.print(f"[red]error:[/] no runs under {Path(args.root) / 'runs'}")
        return 1
    table = Table(title=f"runs under {args.root}")
    table.add_column("run id", no_wrap=True, min_width=max(len(record.get("run_id", "?")) for record in records))
    for column in ("name", "status", "started", "built", "cached", "failed"):
        table.add_column(column)
    for record in records:
        states = [info.get("state") for info in record.get("stages", {}).values()]
        table.add_row(
            record.get("run_id", "?"), record.get("run_name", "?"), record.get("status", "?"), record.get("started_at", "")[:16].replace("T", " "),
            str(states.count("built")), str(states.count("cached")), str(states.count("failed")),
        )
    console.print(table)
    return 0


def command_status(args) -> int:
    from posttrain.runs import find_run

    record = find_run(Path(args.root), args.run)
    if record is None:
        errors.print(f"[red]error:[/] {args.run or 'no runs'}: no such run under {Path(args.root) / 'runs'}")
        return 1
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print_stage_table(record)
    return 0 if record["status"] in ("succeeded", "running") else 1


def command_verify(args) -> int:
    from posttrain.artifacts import MANIFEST, Artifact, Store, TamperedArtifact, check_files

    store = Store(Path(args.root))
    target = Path(args.target) if args.target else None
    if target is not None and (target / MANIFEST).is_file():
        artifacts = [Artifact.load(target)]
    else:
        artifacts = store.artifacts(args.target)
    if not artifacts:
        errors.print(f"[red]error:[/] no published artifacts for {args.target or 'the store'} under {store.root / 'store'}")
        return 1
    bad = 0
    for artifact in artifacts:
        try:
            check_files(artifact, rehash=True)
            console.print(f"ok       {artifact.manifest.get('path', artifact.path)}  ({len(artifact.manifest.get('files', {}))} files)")
        except TamperedArtifact as exc:
            bad += 1
            console.print(f"[red]TAMPERED[/] {exc}")
    console.print(f"{len(artifacts) - bad} of {len(artifacts)} artifacts match their manifests")
    return 1 if bad else 0


def command_promote(args) -> int:
    """Move `champion` to a model of a run by hand; recorded on the version and the run as manual."""
    from posttrain.runs import find_run
    from posttrain.tracking import CHAMPION, TAG, default_tracking_uri

    root = Path(args.root)
    record = find_run(root, args.run)
    if record is None:
        errors.print(f"[red]error:[/] {args.run}: no such run under {root / 'runs'}")
        return 1
    configure_environment()
    import mlflow

    tracking = record["config"]["tracking"]
    client = mlflow.MlflowClient(tracking_uri=tracking["uri"] or default_tracking_uri(root))
    name = tracking["registered_model"] or record["run_name"]
    found = client.search_model_versions(f"name = '{name}' and tags.`{TAG}model` = '{args.model}' and tags.`{TAG}run_id` = '{record['run_id']}'")
    if not found:  # a cached stage: its version was registered by the run that built it
        stage, _, variant = {"student": "distill"}.get(args.model, args.model).partition("quantize-")
        stage_path = record["stages"].get(stage or "quantize", {}).get("path")
        store_path = f"{stage_path}/{variant}" if variant else stage_path
        found = [v for v in client.search_model_versions(f"name = '{name}' and tags.`{TAG}model` = '{args.model}'") if v.tags.get(f"{TAG}store_path") == store_path]
    if not found:
        errors.print(f"[red]error:[/] run {record['run_id']}: no registered version of model {args.model!r} in {name!r}")
        return 1
    version = found[0].version
    client.set_registered_model_alias(name, CHAMPION, version)
    tags = {f"{TAG}gate.decision": "promoted by hand", f"{TAG}gate.reason": args.reason or f"posttrain promote {record['run_id']} --model {args.model}"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    console.print(f"{name} v{version} ({args.model} of run {record['run_id']}) is now `{CHAMPION}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the pipeline described by a config file")
    run_parser.add_argument("config")
    run_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. sft.lr=1e-4")
    run_parser.add_argument("--until", metavar="STAGE", help="run only STAGE and the stages it depends on, e.g. --until data (no gate)")
    resume_parser = commands.add_parser("resume", help="continue a failed or killed run (same run, same MLflow parent; training from its last checkpoint)")
    resume_parser.add_argument("run", help="a run id or a run name (its newest run)")
    rerun_parser = commands.add_parser("rerun", help="run a recorded run's config again, rebuilding one stage and everything downstream")
    rerun_parser.add_argument("run", help="a run id or a run name (its newest run)")
    rerun_parser.add_argument("--from", dest="from_stage", required=True, metavar="STAGE", help="the first stage to rebuild, e.g. sft")
    schedule_parser = commands.add_parser("schedule", help="a Prefect deployment that runs CONFIG on a cron schedule (needs PREFECT_API_URL)")
    schedule_parser.add_argument("config")
    schedule_parser.add_argument("--cron", required=True, help='e.g. "0 3 * * 1" (Mondays 03:00 UTC)')
    schedule_parser.add_argument("--pool", default="posttrain", help="the process work pool its runs go to (created if missing)")
    schedule_parser.add_argument("--name", help="the deployment's name; default: the config file's name")
    schedule_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override every scheduled run gets")
    worker_parser = commands.add_parser("worker", help="run the scheduled runs of a work pool (prefect worker start)")
    worker_parser.add_argument("--pool", default="posttrain")
    worker_parser.add_argument("--run-once", action="store_true", help="poll once, run what is due, then exit")
    lineage_parser = commands.add_parser("lineage", help="the chain from source files to a model: data, each training stage, code, MLflow runs")
    lineage_parser.add_argument("target", help="a registered version (champion, v3, name/3), a run id or name, or a store folder")
    lineage_parser.add_argument("--json", action="store_true", help="the chain as JSON (manifests without file lists)")
    gc_parser = commands.add_parser("gc", help="remove store folders no kept run, registered version or champion uses")
    gc_parser.add_argument("--keep-runs", type=int, default=5, metavar="N", help="keep every folder the newest N finished runs used (default 5)")
    gc_parser.add_argument("--dry-run", action="store_true", help="say what would be removed and how much it would free")
    runs_parser = commands.add_parser("runs", help="list the runs recorded under the store root")
    status_parser = commands.add_parser("status", help="stages, states, cache hits and key metrics of a run")
    status_parser.add_argument("run", nargs="?", help="a run id or a run name (its newest run); default: the newest run")
    status_parser.add_argument("--json", action="store_true", help="print the run record as JSON")
    verify_parser = commands.add_parser("verify", help="re-hash published artifacts and compare them with their manifests")
    verify_parser.add_argument("target", nargs="?", help="a stage name or an artifact folder; default: every artifact")
    promote_parser = commands.add_parser("promote", help="make a model of a run the registered model's champion, by hand")
    promote_parser.add_argument("run", help="a run id or a run name (its newest run)")
    promote_parser.add_argument("--model", required=True, help="sft, align-dpo, student, quantize-nf4, ...")
    promote_parser.add_argument("--reason", help="recorded on the version")
    for sub in (resume_parser, rerun_parser, lineage_parser, gc_parser, runs_parser, status_parser, verify_parser, promote_parser):
        sub.add_argument("--root", default="artifacts", help="the store root (store_root in the config)")
    args = parser.parse_args(argv)
    commands_by_name = {"run": command_run, "resume": command_resume, "rerun": command_rerun, "gc": command_gc, "lineage": command_lineage, "schedule": command_schedule, "worker": command_worker, "runs": command_runs, "status": command_status, "verify": command_verify, "promote": command_promote}
    try:
        return commands_by_name[args.command](args)
    except ConfigError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
