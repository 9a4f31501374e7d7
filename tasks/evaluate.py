"""Evaluate stage: every model of the run on the held-out benchmarks, side by side.

    run(EvaluateConfig(max_new_tokens=24), {"benchmarks": b, "base": m0, "sft": m1, ...}, out_dir)

Every input other than `benchmarks` is a model folder. An input whose manifest lists `variants`
(the quantize stage) contributes one model per variant subfolder (`quantize-nf4`, ...). Each model
generates greedily for every benchmark prompt — the prompt is the user message, the model's own
chat template wraps it (posttrain.formatting.ChatFormat), as in training — and is scored by exact
match per skill. Writes `results.json` (the table) and
`results.md`; metrics are `<model>.<benchmark>.<skill>` and `<model>.<benchmark>.mean`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from posttrain import formatting
from posttrain.artifacts import Artifact
from posttrain.benchmarks import exact_match
from posttrain.config import EvaluateConfig
from posttrain.formatting import ChatFormat, record_messages
from posttrain.jsonl import read_jsonl
from posttrain.models import load_causal_lm, load_tokenizer, pick_device, quiet_bitsandbytes


def model_folders(inputs: dict[str, Artifact]) -> dict[str, Path]:
    """Name -> model folder, expanding quantized variants; in input order (base first)."""
    folders: dict[str, Path] = {}
    for name, artifact in inputs.items():
        if name == "benchmarks":
            continue
        variants = artifact.manifest.get("variants")
        if variants:
            for variant in variants:
                folders[f"{name}-{variant}"] = artifact.path / variant
        else:
            folders[name] = artifact.path
    return folders


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for benchmark prompts: each prompt is the user message, the model's chat
    template wraps it (with the generation prompt), generation stops at EOS or the end of turn;
    batched with left padding."""
    chat = ChatFormat(tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = chat.prompt_ids([{"prompt": prompt} for prompt in prompts[start : start + batch_size]])
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=chat.stop_token_ids,
        )
        for row in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True):
            answers.append(formatting.parse_completion(row))
    return answers


def score_model(folder: Path, benchmarks: dict[str, list[dict]], config: EvaluateConfig) -> tuple[dict, list[dict]]:
    import bitsandbytes  # noqa: F401  transformers loads it for quantized variants; imported here so its version is in this stage's key

    tokenizer = load_tokenizer(folder)
    with quiet_bitsandbytes():  # bitsandbytes logs once per matmul on CPU
        # Every model on the same device: left without a device_map, a plain model loads on the CPU while
        # transformers puts a bitsandbytes one on the GPU, so on a GPU machine only the quantized
        # variants were scored there.
        model = load_causal_lm(folder, device_map={"": pick_device()})
        model.eval()
        scores: dict = {}
        samples: list[dict] = []
        started = time.perf_counter()
        for bench_name, items in benchmarks.items():
            predictions = generate_answers(model, tokenizer, [i["prompt"] for i in items], config.max_new_tokens, config.batch_size)
            by_skill: dict[str, list[bool]] = defaultdict(list)
            for item, prediction in zip(items, predictions):
                correct = exact_match(prediction, item["answer"])
                by_skill[item["skill"]].append(correct)
                samples.append({"benchmark": bench_name, "id": item["id"], "prediction": prediction, "correct": correct})
            per_skill = {skill: sum(hits) / len(hits) for skill, hits in by_skill.items()}
            scores[bench_name] = {**per_skill, "mean": sum(per_skill.values()) / len(per_skill)}
    scores["seconds"] = time.perf_counter() - started
    return scores, samples


def _limit(items: list[dict], per_skill: int | None) -> list[dict]:
    if per_skill is None:
        return items
    kept: dict[str, int] = defaultdict(int)
    chosen = []
    for item in items:
        if kept[item["skill"]] < per_skill:
            kept[item["skill"]] += 1
            chosen.append(item)
    return chosen


def render_markdown(table: dict[str, dict]) -> str:
    lines = []
    for bench_name in next(iter(table.values()))["scores"]:
        if bench_name == "seconds":
            continue
        columns = list(next(iter(table.values()))["scores"][bench_name])
        lines.append(f"### {bench_name} (exact match, %)\n")
        lines.append("| model | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for model_name, row in table.items():
            values = [f"{100 * row['scores'][bench_name][column]:.1f}" for column in columns]
            lines.append(f"| {model_name} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def run(config: EvaluateConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    benchmark_dir = inputs["benchmarks"].path
    benchmarks = {
        path.stem: _limit(read_jsonl(path), config.limit_per_skill) for path in sorted(benchmark_dir.glob("*.jsonl"))
    }
    table: dict[str, dict] = {}
    all_samples: dict[str, list[dict]] = {}
    templates: dict[str, dict] = {}
    first_prompt = next(iter(benchmarks.values()))[0]["prompt"]
    for model_name, folder in model_folders(inputs).items():
        scores, samples = score_model(folder, benchmarks, config)
        table[model_name] = {"scores": scores}
        all_samples[model_name] = samples
        # The template each model generated with, and the first prompt as it saw it.
        templates[model_name] = ChatFormat(load_tokenizer(folder)).describe(record_messages({"prompt": first_prompt}, None), add_generation_prompt=True)

    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(table, indent=2))
    (out_dir / "results.md").write_text(render_markdown(table))
    (out_dir / "samples.json").write_text(json.dumps(all_samples))
    metrics = {}
    for model_name, row in table.items():
        for bench_name, per_skill in row["scores"].items():
            if bench_name == "seconds":
                metrics[f"{model_name}.seconds"] = round(per_skill, 2)
                continue
            for skill, value in per_skill.items():
                metrics[f"{model_name}.{bench_name}.{skill}"] = round(value, 4)
    return Artifact.draft(out_dir, metrics, models=list(table), chat_templates=templates)
