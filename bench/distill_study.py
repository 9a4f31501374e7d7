"""The distillation study: the KD student against its control, plain SFT of the same student, over seeds.

    nice -n 10 .venv/bin/python bench/distill_study.py                       # configs/demo.yaml, seeds 0 1 2
    nice -n 10 .venv/bin/python bench/distill_study.py --seeds 0 --set distill.temperature=1

base → benchmarks → data → sft are built once through the runner, from configs/demo.yaml (the same
settings, so the same artifacts) in the store <repo>/artifacts/distill-study. The teacher is the
config's `distill.teacher` (the demo: sft). For each seed, two distill stages, also through the
runner (so an interrupted study resumes from the store):
  - KD: the config's distill section (the demo's alpha, temperature, top_k, steps);
  - the control: the same section with `alpha: 1` — plain SFT of the same student on the same rows
    in the same order, for the same steps, from the same initialisation (the seed). `alpha: 1`
    never reads temperature or top_k, so the control is keyed at their defaults and one control
    serves every KD variant of a seed.
Both students, and the teacher, are scored by the evaluate stage on the run's benchmarks (greedy
exact match). The seed varies the distill stage only (student initialisation, row order); the
teacher is the same.

The KD settings were chosen on held-out rows of the data stage's instruction eval split (the
distill stage's eval loss and argmax agreement, and the greedy exact match this script prints as
`val EM` on `--val-rows` of them), never on the benchmark items; `--set distill.<key>=<value>`
tries another setting. Prints, per seed: exact match (mean over the tasks, and per task), the
KD−control difference, eval-split loss and agreement with the teacher, seconds; then mean, min and
max over seeds. Figures: docs/benchmarks.md, "Distillation study".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.align_study import build_upstream  # noqa: E402
from posttrain.artifacts import Artifact, Store  # noqa: E402
from posttrain.benchmarks import first_line  # noqa: E402
from posttrain.config import DistillConfig, EvaluateConfig, load_config  # noqa: E402
from posttrain.runner import execute_stage  # noqa: E402

SCORING = EvaluateConfig(sample_items=0, loss_rows=0)  # greedy exact match only: what the study compares


def exact_match(cfg, store: Store, model: Artifact, benchmarks: Artifact) -> dict[str, float]:
    """Per-task greedy exact match (and `mean`) of one model, by the evaluate stage (cached in the store)."""
    artifact = execute_stage("evaluate", "tasks.evaluate", SCORING, {"model": model, "benchmarks": benchmarks}, store, cfg.seed, None, cfg.runtime.threads).artifact
    results = json.loads((Path(artifact.path) / "results.json").read_text())
    return {task: row["exact_match"] for task, row in results.items() if "exact_match" in row}


@torch.no_grad()
def validation_exact_match(model: Artifact, data: Artifact, rows: int) -> float:
    """Greedy exact match on the first `rows` rows of the data stage's instruction eval split:
    held-out rows the student never trains on, and not the benchmark items (those are for the table)."""
    from posttrain.formatting import ChatFormat
    from posttrain.jsonl import read_instruction_rows
    from posttrain.models import load_causal_lm, load_tokenizer
    from tasks.evaluate import generate

    records = read_instruction_rows(Path(data.path) / "instruction" / "eval.jsonl")[:rows]
    network = load_causal_lm(model.path).eval()
    replies = generate(network, ChatFormat(load_tokenizer(model.path)), records, SCORING)
    return sum(first_line(reply["reply"]) == first_line(row["response"]) for row, reply in zip(records, replies)) / len(records)


def distill(cfg, store: Store, section: DistillConfig, upstream: dict[str, Artifact], val_rows: int) -> dict:
    teacher = upstream[cfg.distill.teacher]
    outcome = execute_stage("distill", "tasks.distill", section, {"teacher": teacher, "data": upstream["data"]}, store, cfg.seed, None, cfg.runtime.threads)
    m = outcome.artifact.manifest["metrics"]
    return {
        "scores": exact_match(cfg, store, outcome.artifact, upstream["benchmarks"]),
        "val_em": validation_exact_match(outcome.artifact, upstream["data"], val_rows),
        "eval_loss": m["student_eval_loss"],
        "agreement": m["agreement"],
        "seconds": m["train_seconds"] + m["teacher_precompute_seconds"],
        "teacher_eval_loss": m["teacher_eval_loss"],
        "size_ratio": m["size_ratio"],
    }


def spread(values: list[float], scale: float = 100, digits: int = 1) -> str:
    mean = sum(values) / len(values) * scale
    return f"{mean:.{digits}f} ({min(values) * scale:.{digits}f} – {max(values) * scale:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. distill.temperature=1")
    parser.add_argument("--val-rows", type=int, default=600, help="instruction eval-split rows for the validation exact match")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / args.config, ["store_root=artifacts/distill-study", *args.set])
    store = Store((REPO / cfg.store_root).resolve())  # relative to the repository, as the CLI run from it
    upstream = build_upstream(cfg, store, ("base", "benchmarks", "data", "sft"))
    teacher = upstream[cfg.distill.teacher]
    teacher_scores = exact_match(cfg, store, teacher, upstream["benchmarks"])
    teacher_val = validation_exact_match(teacher, upstream["data"], args.val_rows)
    defaults = DistillConfig()
    rows = []
    for seed in args.seeds:
        kd = cfg.distill.model_copy(update={"seed": seed})
        control = kd.model_copy(update={"alpha": 1.0, "temperature": defaults.temperature, "top_k": defaults.top_k})
        rows.append((seed, distill(cfg, store, kd, upstream, args.val_rows), distill(cfg, store, control, upstream, args.val_rows)))
        print(f"seed {seed}: KD {100 * rows[-1][1]['scores']['mean']:.1f}, control {100 * rows[-1][2]['scores']['mean']:.1f}", flush=True)

    d = cfg.distill
    tasks = [task for task in teacher_scores if task != "mean"]
    print(
        f"\n{args.config} {' '.join(args.set)}: teacher {d.teacher} (EM {100 * teacher_scores['mean']:.1f}, val EM {100 * teacher_val:.1f}, "
        f"eval loss {rows[0][1]['teacher_eval_loss']:.3f}), student {rows[0][1]['size_ratio']:.2f}× its parameters; "
        f"KD alpha {d.alpha}, T {d.temperature}, top_k {d.top_k}; both arms {d.max_steps} steps × {d.batch_size} rows, lr {d.lr}\n"
    )
    print(f"| seed | model | EM % | {' | '.join(tasks)} | val EM % | eval loss | agreement | s |")
    print(f"|---|---|---:|{'---:|' * len(tasks)}---:|---:|---:|---:|")
    print(f"| — | teacher ({d.teacher}) | {100 * teacher_scores['mean']:.1f} | {' | '.join(f'{100 * teacher_scores[t]:.0f}' for t in tasks)} | {100 * teacher_val:.1f} | {rows[0][1]['teacher_eval_loss']:.3f} | 1 | — |")
    for seed, kd, control in rows:
        for label, r in (("KD", kd), ("control (alpha 1)", control)):
            per_task = " | ".join(f"{100 * r['scores'][t]:.0f}" for t in tasks)
            print(
                f"| {seed} | {label} | {100 * r['scores']['mean']:.1f} | {per_task} | "
                f"{100 * r['val_em']:.1f} | {r['eval_loss']:.3f} | {r['agreement']:.3f} | {r['seconds']:.0f} |"
            )
    print("\nover seeds, mean (min – max):")
    for label, index in (("KD", 1), ("control", 2)):
        runs = [row[index] for row in rows]
        print(
            f"  {label:<8} EM {spread([r['scores']['mean'] for r in runs])}, val EM {spread([r['val_em'] for r in runs])}, "
            f"eval loss {spread([r['eval_loss'] for r in runs], 1, 3)}, agreement {spread([r['agreement'] for r in runs], 1, 3)}"
        )
    gaps = [kd["scores"]["mean"] - control["scores"]["mean"] for _, kd, control in rows]
    val_gaps = [kd["val_em"] - control["val_em"] for _, kd, control in rows]
    print(f"  KD − control, EM points per seed: {', '.join(f'{100 * g:+.1f}' for g in gaps)}; val EM: {', '.join(f'{100 * g:+.1f}' for g in val_gaps)}")
    print(f"  KD ≥ control in every seed: {'yes' if all(g >= 0 for g in gaps) else 'no'}")


if __name__ == "__main__":
    main()
