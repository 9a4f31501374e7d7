"""Run the training stages of a config once on a GPU (or the CPU) without Prefect or MLflow.

    # 1. on a machine with the full stack: base, benchmarks and data into a store
    .venv/bin/python bench/gpu_check.py prepare configs/demo.yaml --store gpu_store
    # 2. on the GPU machine (bench/gpu_check.sh installs the wheels and calls this):
    python bench/gpu_check.py train configs/demo.yaml --store gpu_store --out $OUT/gpu_check.json

`prepare` runs base, benchmarks and data through posttrain.runner.execute_stage (the data stage
needs Great Expectations, which the GPU image lacks) and writes `<store>/prepared.json` naming the
three artifact folders. `train` loads those folders and runs the remaining steps of flows/plan.py
(sft, reward, align-*, distill, quantize, evaluate) in this process, with the same inputs and
seeds as the flow, publishing into the same store. The training stages run their tokenized data
contracts, so the GPU machine needs Great Expectations too (carry its wheels). It prints and writes (JSON, and Markdown beside it) the
device, the library versions, per-stage seconds, tokens/s, peak CUDA memory, the device each
evaluated model generated on, and the evaluate table. A failed stage is recorded and the stages
that do not need it still run; the exit status is 1 if any stage failed.

`--probe-steps N` then runs the sft stage twice more for N steps, with `method: lora` and with
`method: qlora` (LoRA on a 4-bit NF4 base, which needs the GPU), and scores both with the evaluate
stage's scorer. `--deadline S` skips them once S seconds have passed since the start.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from posttrain.env import configure_environment  # noqa: E402 (after sys.path and the environment are set)

configure_environment()

from flows.plan import needs_candidate, plan  # noqa: E402 (after sys.path and the environment are set)
from posttrain.artifacts import Artifact, Store  # noqa: E402 (after sys.path and the environment are set)
from posttrain.config import load_config  # noqa: E402 (after sys.path and the environment are set)
from posttrain.runner import execute_stage  # noqa: E402 (after sys.path and the environment are set)

PREPARED = "prepared.json"

KEY_METRICS = (
    "final_train_loss", "eval_loss_before", "eval_loss", "trainable_parameters", "parameters",
    "eval_before_accuracy", "eval_accuracy", "eval_before_implicit_reward_accuracy",
    "eval_implicit_reward_accuracy", "eval_chosen_logp_change", "reference_precomputed", "seconds_per_step",
    "teacher_precompute_seconds", "student_eval_loss_before", "student_eval_loss", "teacher_eval_loss",
    "agreement_before", "agreement",
    "source_bytes", "source_eval_loss",
    "nf4_bytes", "nf4_size_ratio", "nf4_eval_loss", "nf4_loss_delta", "nf4_agreement", "nf4_generate_match",
    "nf4_quantized_fraction", "nf4_quantize_seconds", "nf4_load_seconds",
    "int8_bytes", "int8_size_ratio", "int8_eval_loss", "int8_loss_delta", "int8_agreement", "int8_generate_match",
    "int8_quantized_fraction", "int8_quantize_seconds", "int8_load_seconds",
)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _metric_subset(metrics: dict) -> dict:
    return {key: metrics[key] for key in KEY_METRICS if key in metrics}


# ----------------------------------------------------------------------------- prepare (CPU, full stack)


def prepare(args) -> None:
    cfg = load_config(args.config, args.set)
    store = Store(Path(args.store).resolve())
    steps = {step.name: step for step in plan(cfg)}
    outcomes: dict = {}
    for name in ("base", "benchmarks", "data"):
        step = steps[name]
        inputs = {key: outcomes[source].artifact for key, source in step.inputs.items()}
        outcomes[name] = execute_stage(name, step.module, step.section, inputs, store, cfg.seed)
    prepared = {}
    for name, outcome in outcomes.items():
        prepared[name] = _rel(outcome.artifact.path)
        print(f"{name}: {'cached' if outcome.cache_hit else f'built in {outcome.seconds:.1f}s'} -> {prepared[name]}")
    (Path(args.store) / PREPARED).write_text(json.dumps(prepared, indent=2))


# ----------------------------------------------------------------------------- train (GPU)


def device_info() -> dict:
    import torch

    from posttrain.closure import environment_versions
    from posttrain.training import use_bf16

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cuda_runtime=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            ).stdout.strip()
        except Exception as exc:  # noqa: BLE001 - informational only
            info["driver"] = f"unknown ({exc})"
    info["trainer_bf16"] = use_bf16()
    info["versions"] = environment_versions(["torch", "transformers", "trl", "peft", "accelerate", "tokenizers", "datasets", "bitsandbytes"])
    return info


def train(args) -> None:
    import torch

    import tasks.evaluate

    started_all = time.perf_counter()
    cfg = load_config(args.config, args.set)
    store_dir = Path(args.store).resolve()
    store = Store(store_dir)
    prepared = json.loads((store_dir / PREPARED).read_text())
    artifacts: dict[str, Artifact] = {name: Artifact.load(REPO_ROOT / path) for name, path in prepared.items()}

    report: dict = {"config": str(args.config), "overrides": args.set, "device": device_info(), "stages": {}}
    print(json.dumps(report["device"], indent=2), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save_report() -> None:
        report["total_seconds"] = round(time.perf_counter() - started_all, 2)
        out_path.write_text(json.dumps(report, indent=2, default=str))
        out_path.with_suffix(".md").write_text(render(report))

    def record_failure(name: str, exc: BaseException) -> None:
        traceback.print_exc()
        report["stages"][name] = {"state": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        save_report()

    def stage(name: str, module: str, section, inputs: dict[str, str], alias: str | None = None) -> Artifact | None:
        label = alias or name
        missing = [source for source in inputs.values() if source not in artifacts]
        if missing:
            report["stages"][label] = {"state": "skipped", "reason": f"missing input {missing[0]}"}
            print(f"=== {label}: skipped (missing {missing[0]})", flush=True)
            save_report()
            return None
        print(f"=== {label}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            outcome = execute_stage(
                name, module, section, {key: artifacts[source] for key, source in inputs.items()}, store, cfg.seed,
                threads=cfg.runtime.threads,
            )
        except Exception as exc:  # noqa: BLE001 - record, and go on with the stages that do not need it
            record_failure(label, exc)
            return None
        artifacts[label] = outcome.artifact
        entry = {
            "state": "cached" if outcome.cache_hit else "built",
            "seconds": outcome.artifact.manifest.get("seconds"),
            "path": _rel(outcome.artifact.path),
            "metrics": outcome.artifact.metrics,
        }
        if torch.cuda.is_available():
            entry["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["stages"][label] = entry
        print(json.dumps({k: v for k, v in entry.items() if k != "metrics"}), flush=True)
        print(json.dumps(_metric_subset(entry["metrics"])), flush=True)
        save_report()
        return outcome.artifact

    # Which device each evaluated model generated on (the evaluate stages place the models themselves).
    generate = tasks.evaluate.generate
    evaluate_devices: dict[str, str] = {}

    def generate_spy(model, *rest, **kwargs):
        evaluate_devices[_rel(Path(model.name_or_path))] = str(next(model.parameters()).device)
        return generate(model, *rest, **kwargs)

    tasks.evaluate.generate = generate_spy
    report["evaluate_devices"] = evaluate_devices

    steps = {step.name: step for step in plan(cfg)}
    for step in plan(cfg):
        if step.name not in ("base", "benchmarks", "data"):
            stage(step.name, step.module, step.section, dict(step.inputs))
    if needs_candidate(cfg) and "report" not in report["stages"]:
        from posttrain.report import choose_candidate

        scored = {name.removeprefix("evaluate-"): json.loads((artifacts[name].path / "results.json").read_text()) for name in artifacts if name.startswith("evaluate-")}
        candidate = choose_candidate(scored, cfg.gate.candidate, cfg.gate.eligible, cfg.gate.primary_metric)
        for step in plan(cfg, candidate):
            if step.name not in artifacts:
                stage(step.name, step.module, step.section, dict(step.inputs))

    if args.probe_steps:
        elapsed = time.perf_counter() - started_all
        if args.deadline and elapsed > args.deadline:
            for name in ("sft-lora", "sft-qlora"):
                report["stages"][name] = {"state": "skipped", "reason": f"deadline: {elapsed:.0f}s > {args.deadline:.0f}s"}
        else:
            for method in ("lora", "qlora"):
                label = f"sft-{method}"
                section = steps["sft"].section.model_copy(update={"method": method, "max_steps": args.probe_steps})
                if stage("sft", "tasks.sft", section, {"base": "base", "data": "data"}, alias=label) is not None:
                    try:
                        report["stages"][label]["scores"] = score_folder(artifacts[label].path, artifacts, cfg)
                    except Exception as exc:  # noqa: BLE001
                        record_failure(label, exc)
                    save_report()
    save_report()
    print(render(report), flush=True)
    failed = [name for name, entry in report["stages"].items() if entry["state"] == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
        sys.exit(1)


def score_folder(folder: Path, artifacts: dict[str, Artifact], cfg) -> dict:
    """The evaluate stage's exact match per task of one model folder, on this run's benchmarks."""
    import tempfile

    import tasks.evaluate

    with tempfile.TemporaryDirectory() as out:
        inputs = {"benchmarks": artifacts["benchmarks"], "model": Artifact(Path(folder), {})}
        tasks.evaluate.run(cfg.evaluate.model_copy(update={"sample_items": 0}), inputs, Path(out))
        results = json.loads((Path(out) / "results.json").read_text())
    return {task: row["exact_match"] for task, row in results.items() if "exact_match" in row}


# ----------------------------------------------------------------------------- report


def render(report: dict) -> str:
    device = report["device"]
    lines = [
        f"# gpu_check: {report['config']} {' '.join(report.get('overrides') or [])}".rstrip(),
        "",
        (
            f"device: {device.get('gpu', 'cpu')}, driver {device.get('driver', '-')}, torch {device['torch']} "
            f"(CUDA {device.get('cuda_runtime', '-')}), python {device['python']}, trainer bf16: {device['trainer_bf16']}"
        ),
        "versions: " + ", ".join(f"{k} {v}" for k, v in device["versions"].items()),
        f"total seconds: {report.get('total_seconds')}",
        "",
        "| stage | state | seconds | train s | tokens/s | steps | peak CUDA MiB | key figures |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in report["stages"].items():
        metrics = entry.get("metrics", {})
        note = entry.get("error") or entry.get("reason") or ", ".join(f"{k} {v}" for k, v in _metric_subset(metrics).items())
        lines.append(
            f"| {name} | {entry['state']} | {entry.get('seconds', '')} | {metrics.get('train_seconds', '')} | "
            f"{metrics.get('tokens_per_second', '')} | {metrics.get('train_steps', '')} | {entry.get('peak_cuda_mib', '')} | {note} |"
        )
    entry = report["stages"].get("report", {})
    results = REPO_ROOT / entry["path"] / "results.md" if entry.get("path") else None
    if results and results.is_file():
        lines += ["", "## report", "", results.read_text()]
        seconds = {name: e["metrics"].get("generation_seconds") for name, e in report["stages"].items() if name.startswith("evaluate-")}
        lines.append("generation seconds: " + ", ".join(f"{k.removeprefix('evaluate-')} {v}" for k, v in seconds.items()))
    if report.get("evaluate_devices"):
        lines.append("")
        lines.append("generated on: " + ", ".join(f"{k}: {v}" for k, v in report["evaluate_devices"].items()))
    for name in ("sft-lora", "sft-qlora"):
        scores = report["stages"].get(name, {}).get("scores")
        if scores:
            lines.append(f"\n{name} (exact match, %): " + ", ".join(f"{task} {100 * value:.1f}" for task, value in scores.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "train"):
        command = sub.add_parser(name)
        command.add_argument("config")
        command.add_argument("--store", default="gpu_store", help="store root (holds store/ and prepared.json)")
        command.add_argument("--set", action="append", default=[], help="config override key=value")
        if name == "train":
            command.add_argument("--out", default="gpu_check.json", help="report file (.json; a .md beside it)")
            command.add_argument("--probe-steps", type=int, default=0, help="also run the LoRA and QLoRA probes for N steps")
            command.add_argument("--deadline", type=float, default=0, help="skip the probes after this many seconds")
    args = parser.parse_args()
    {"prepare": prepare, "train": train}[args.command](args)


if __name__ == "__main__":
    main()
