"""The results of a run in one schema, `{model: {task: {metric: value}}}`, and its one renderer.

    results = join(per_model_results, targets, base_is_random)     # adds comparisons between models
    candidate = choose_candidate(results, gate)                    # the model the gate may promote
    console.print(terminal_table(results))                         # models x key metrics, ≤ 100 columns
    markdown_table(results); mlflow_table(results)                 # the same rows for docs and MLflow

Each model's own figures come from its evaluate stage; `join` adds what needs two models:
- `win_rate_vs_sft`: how often the run's reward model scores a model's greedy reply above SFT's to
  the same prompt (ties half), per task and in `mean`;
- `alignment_tax` / `targeted_gain` (aligned branches only): the mean change in exact match against
  SFT over the tasks alignment did not target / did target (`align.target_skills`);
- `forgetting` (models trained from a real base): the change against base on general tasks (tagged
  `general`, e.g. GSM8K). With the demo's randomly initialised base there is nothing to forget, and
  the notes say so instead of printing a meaningless number.
The `mean` row holds exact match averaged over the tasks and the pooled figures.
"""

from __future__ import annotations

import math

from posttrain.metrics import goodness, win_rate

KEY_COLUMNS = (
    ("exact_match", "EM"),
    ("ece", "ECE"),
    ("ece_scaled", "ECE/T"),
    ("self_consistency_k*", "maj@K"),  # * = the largest k of the run
    ("best_of_n_k*", "bo@K"),
    ("completion_loss", "loss"),
    ("win_rate_vs_sft", "win"),
)
MEAN = "mean"


def _mean(values: list[float]) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def join(
    per_model: dict[str, dict],
    generations: dict[str, list[dict]],
    tasks: dict[str, dict],
    aligned: list[str],
    target_tasks: list[str] | None,
    base_is_random: bool,
) -> tuple[dict, list[str]]:
    """The run's results and its notes. `per_model`: each evaluate stage's results.json;
    `generations`: each model's saved greedy records (for reward win rates); `tasks`: tasks.json."""
    results = {model: {task: dict(row) for task, row in rows.items()} for model, rows in per_model.items()}
    notes = []
    scored_tasks = [name for name, spec in tasks.items() if spec.get("kind", "generation") == "generation"]
    if "sft" in generations:
        sft_rewards = {r["id"]: r["reward"] for r in generations["sft"] if "reward" in r and r.get("split", "score") == "score"}
        for model, records in generations.items():
            by_task: dict[str, tuple[list, list]] = {}
            for record in records:
                if record["id"] in sft_rewards and "reward" in record and record.get("split", "score") == "score":
                    mine, theirs = by_task.setdefault(record["task"], ([], []))
                    mine.append(record["reward"])
                    theirs.append(sft_rewards[record["id"]])
            for task, (mine, theirs) in by_task.items():
                results[model].setdefault(task, {})["win_rate_vs_sft"] = win_rate(mine, theirs)
            if by_task:
                pooled = [pair for pairs in by_task.values() for pair in zip(*pairs)]
                results[model][MEAN]["win_rate_vs_sft"] = win_rate([a for a, _ in pooled], [b for _, b in pooled])
    else:
        notes.append("no sft model in this run: win rates against sft are not reported")
    if "sft" in results:
        targets = set(target_tasks or [])
        for model in aligned:
            if model not in results:
                continue
            delta = {task: results[model][task]["exact_match"] - results["sft"][task]["exact_match"] for task in scored_tasks if task in results["sft"]}
            if targets:
                results[model][MEAN]["targeted_gain"] = _mean([d for task, d in delta.items() if task in targets])
                results[model][MEAN]["alignment_tax"] = -_mean([d for task, d in delta.items() if task not in targets])
            for task, change in delta.items():
                results[model][task]["change_vs_sft"] = change
        if aligned and not targets:
            notes.append("align.target_skills is not set: every task counts as targeted, so no alignment tax is reported")
    general = [name for name, spec in tasks.items() if "general" in spec.get("tags", []) and name in scored_tasks]
    if base_is_random:
        notes.append("the base model is randomly initialised (the demo): forgetting against base is not meaningful and is not reported")
    elif "base" in results and general:
        for model in results:
            if model != "base":
                results[model][MEAN]["forgetting"] = -_mean([results[model][t]["exact_match"] - results["base"][t]["exact_match"] for t in general])
    elif not general:
        notes.append("no general task (tag `general`, e.g. gsm8k) in this run: forgetting is not measured")
    return results, notes


def choose_candidate(results: dict, candidate: str, eligible: list[str] | None, primary_metric: str) -> str:
    """The model the gate may promote: the named one, or the best eligible model by the primary
    metric's `mean` (lowest for a loss or an ECE; first in the run's order on a tie). Never the base or a quantized variant unless
    named eligible."""
    if candidate != "best":
        if candidate not in results:
            raise ValueError(f"gate.candidate: {candidate!r} is not a model of this run ({', '.join(results)})")
        return candidate
    names = eligible or [m for m in results if m != "base" and not m.startswith("quantize-")]
    scored = [(goodness(primary_metric, results[m][MEAN].get(primary_metric, math.nan)), -i, m) for i, m in enumerate(names) if m in results]
    scored = [entry for entry in scored if math.isfinite(entry[0])]
    if not scored:
        raise ValueError(f"gate: no eligible model has a finite {primary_metric}")
    return max(scored)[2]


# ----------------------------------------------------------------------------- rendering


NOT_PERCENT = ("completion_loss", "perplexity", "temperature", "reward_mean")


def _cell(value, metric: str = "exact_match") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:.3g}" if metric in NOT_PERCENT else f"{100 * value:.1f}"


def _key_columns(results: dict) -> list[tuple[str, str]]:
    """KEY_COLUMNS with * replaced by the largest k any model reports."""
    ks = [int(key.rsplit("_k", 1)[1]) for row in results.values() for key in row[MEAN] if key.startswith("self_consistency_k")]
    top = max(ks, default=0)
    return [(key.replace("*", str(top)), label.replace("K", str(top))) for key, label in KEY_COLUMNS if "*" not in key or top]


def rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per model — exact match per task, then the mean row's key figures."""
    first = next(iter(results.values()))
    tasks = [task for task in first if task != MEAN and "exact_match" in first[task]]
    columns = _key_columns(results)
    header = ["model", *tasks, *(label for _, label in columns)]
    table = []
    for model, by_task in results.items():
        table.append([model, *(_cell(by_task.get(t, {}).get("exact_match")) for t in tasks), *(_cell(by_task[MEAN].get(key), key) for key, _ in columns)])
    return header, table


def terminal_table(results: dict, title: str = "held-out results (% unless noted)"):
    from rich import box
    from rich.table import Table

    header, table = rows(results)
    # No vertical rules and one space between columns: 14 columns fit in 100.
    rendered = Table(title=title, box=box.MINIMAL_HEAVY_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for position, name in enumerate(header):
        rendered.add_column(name, justify="left" if position == 0 else "right", no_wrap=True)
    for row in table:
        rendered.add_row(*row)
    return rendered


def markdown_table(results: dict) -> str:
    header, table = rows(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    legend = ", ".join(f"{label} = {key}" for key, label in _key_columns(results))
    return "\n".join(lines) + f"\n\nPer-task columns: exact match (%). {legend} (mean row; ECE/T after temperature scaling; loss: completion loss on the SFT eval split, not a percentage).\n"


def mlflow_table(results: dict) -> dict[str, list]:
    """Long form for mlflow.log_table: one row per (model, task, metric)."""
    columns = {"model": [], "task": [], "metric": [], "value": []}
    for model, by_task in results.items():
        for task, metrics in by_task.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    for column, item in zip(columns, (model, task, metric, float(value))):
                        columns[column].append(item)
    return columns


def charts(results: dict, reliability: dict[str, dict], ks: list[int], out_dir) -> list[str]:
    """accuracy.png (exact match per model and task), scaling.png (accuracy vs k per model),
    reliability.png (confidence vs accuracy per model, before and after temperature scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = list(results)
    tasks = [t for t in results[models[0]] if t != MEAN and "exact_match" in results[models[0]][t]]
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(tasks) + 2), 3.6))
    width = 0.8 / max(len(models), 1)
    for position, model in enumerate(models):
        axis.bar([i + position * width for i in range(len(tasks))], [100 * results[model][t]["exact_match"] for t in tasks], width, label=model)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    axis.set(ylabel="exact match (%)", ylim=(0, 100), title="held-out exact match per task")
    axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy.png", dpi=110)
    plt.close(figure)
    written.append("accuracy.png")

    figure, axis = plt.subplots(figsize=(6, 3.8))
    for model in models:
        mean = results[model][MEAN]
        for method, style in (("self_consistency", "-"), ("best_of_n", "--")):
            points = [(k, mean[f"{method}_k{k}"]) for k in ks if f"{method}_k{k}" in mean]
            if points:
                axis.plot([k for k, _ in points], [100 * v for _, v in points], style, marker="o", markersize=3, label=f"{model} {method.replace('_', '-')}")
    axis.set_xscale("log", base=2)
    axis.set(xlabel="k (samples)", ylabel="accuracy (%)", title="test-time scaling (solid: majority vote, dashed: best-of-N by the reward model)")
    axis.title.set_fontsize(8)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(figure)
    written.append("scaling.png")

    if reliability:
        columns = min(3, len(reliability))
        lines = math.ceil(len(reliability) / columns)
        figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.2 * lines), squeeze=False)
        for axis, (model, bins) in zip(axes.flat, reliability.items()):
            axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            for label, key, style in (("before", "before", "o-"), ("scaled", "after", "s--")):
                points = [(b["confidence"], b["accuracy"]) for b in bins[key] if b["count"]]
                if points:
                    axis.plot(*zip(*points), style, markersize=3, label=label)
            axis.set(xlim=(0, 1), ylim=(0, 1), title=model)
            axis.title.set_fontsize(8)
            axis.legend(fontsize=6)
        for axis in list(axes.flat)[len(reliability) :]:
            axis.axis("off")
        figure.suptitle("reliability: confidence vs accuracy", fontsize=9)
        figure.tight_layout()
        figure.savefig(out_dir / "reliability.png", dpi=110)
        plt.close(figure)
        written.append("reliability.png")
    return written
