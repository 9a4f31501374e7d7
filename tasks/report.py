"""Report stage: every model's evaluation joined into one table, its comparisons, and charts.

    run(ReportConfig(aligned=["align-dpo"], target_tasks=["reverse"]), {"sft": evaluate_sft, ...}, out_dir)

Inputs: one evaluate-<model> artifact per model (named by the model), the benchmarks, and the
run's reward model when there is one (its pairwise accuracy on the preference tasks' held-out
pairs). Writes results.json in the run's one schema `{model: {task: {metric: value}}}`
(posttrain.report.join adds win rates against SFT, alignment tax and forgetting), results.md,
table.json (long form, for mlflow.log_table), report.json (the candidate and the notes) and the
charts accuracy.png, scaling.png and reliability.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain import report
from posttrain.artifacts import Artifact
from posttrain.config import ReportConfig
from posttrain.jsonl import read_jsonl

NOT_MODELS = ("benchmarks", "reward")


def reward_model_accuracy(reward_dir: Path, bench_dir: Path, tasks: dict) -> dict[str, float]:
    """Pairwise accuracy of the reward model on each preference task's scored pairs."""
    from posttrain.formatting import ChatFormat
    from posttrain.models import load_reward_model, load_tokenizer
    from posttrain.scoring import pair_ids, pairwise_metrics

    accuracy = {}
    names = [name for name, spec in tasks.items() if spec.get("kind") == "preference"]
    if not names:
        return accuracy
    tokenizer = load_tokenizer(reward_dir)
    model = load_reward_model(reward_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    for name in names:
        rows = [item for item in read_jsonl(bench_dir / f"{name}.jsonl") if item["split"] == "score"]
        pairs = pair_ids(ChatFormat(tokenizer).split_replies(rows))
        accuracy[name] = pairwise_metrics(model, pairs, rows, tokenizer.pad_token_id, 2048, prefix="")["accuracy"]
    return accuracy


def run(config: ReportConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    out_dir = Path(out_dir)
    bench_dir = Path(inputs["benchmarks"].path)
    tasks = json.loads((bench_dir / "tasks.json").read_text())
    models = {name: Path(artifact.path) for name, artifact in inputs.items() if name not in NOT_MODELS}
    per_model = {name: json.loads((folder / "results.json").read_text()) for name, folder in models.items()}
    generations = {name: read_jsonl(folder / "generations.jsonl") for name, folder in models.items()}
    results, notes = report.join(per_model, generations, tasks, config.aligned, config.target_tasks, config.base_is_random)
    reward_accuracy = reward_model_accuracy(Path(inputs["reward"].path), bench_dir, tasks) if "reward" in inputs else {}
    for model in results:
        for task, accuracy in reward_accuracy.items():
            results[model].setdefault(task, {})["reward_model_accuracy"] = accuracy
    candidate = report.choose_candidate(results, config.candidate, config.eligible, config.primary_metric)

    (out_dir / "results.json").write_text(json.dumps(results, indent=2))  # models and tasks in the run's order
    (out_dir / "results.md").write_text(report.markdown_table(results) + "".join(f"\n- {note}" for note in notes) + "\n")
    (out_dir / "table.json").write_text(json.dumps(report.mlflow_table(results)))
    (out_dir / "report.json").write_text(json.dumps({"candidate": candidate, "notes": notes, "reward_model_accuracy": reward_accuracy}, indent=2))
    reliability = {name: json.loads((folder / "reliability.json").read_text()) for name, folder in models.items() if (folder / "reliability.json").is_file()}
    charts = report.charts(results, reliability, config.ks, out_dir)
    metrics = {
        f"{model}.{task}.{metric}": round(value, 5)
        for model, by_task in results.items()
        for task, row in by_task.items()
        for metric, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    return Artifact.draft(out_dir, metrics, candidate=candidate, models=list(results), notes=notes, charts=charts)
