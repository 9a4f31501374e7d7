"""Evaluate stage: one model on every benchmark task — generations saved, then the metrics.

    run(EvaluateConfig(), {"benchmarks": b, "model": sft, "data": data, "reward": rm}, out_dir)

Each model of the run is scored by its own cached stage (`evaluate-<model>`; flows/plan.py), so a
change to one branch re-scores only that branch; the report stage joins them. `data` (the SFT eval
split, for completion loss) and `reward` (for best-of-N and reward scores) are optional; the
`variant` of the config picks a quantized subfolder of `model`.

Generation (saved in generations.jsonl, the logits in logits.safetensors):
- greedy, for every item of every generation task (scored and calibration split): the reply, the
  extracted answer, and for each generated token its logits (the chosen token first, then the top
  others), so its probability can be recomputed at any temperature;
- `samples` samples at `temperature` for `sample_items` scored items spread over the tasks, for
  test-time scaling, each with its extracted answer and (with a reward model) its reward;
- greedy replies to the prompts of preference tasks, scored by the reward model (win rates).
Every prompt is the task's user message wrapped by the model's chat template (ChatFormat), and
generation stops at EOS or the template's end-of-turn token.

Metrics (posttrain.metrics, pure functions of those records), written to results.json as
{task: {metric: value}} plus a `mean` row: exact_match; ece and ece_scaled (10 bins, sequence
probability vs correctness, before and after the temperature fitted on the calibration split);
self_consistency_k<k> and best_of_n_k<k> with greedy_on_subset for comparison; reward_mean; completion_loss
and perplexity. A reliability diagram goes to reliability.png.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import LogitsProcessor, LogitsProcessorList

from posttrain import failpoints
from posttrain import metrics as m
from posttrain.artifacts import Artifact
from posttrain.benchmarks import BenchmarkTask, extract_answer
from posttrain.config import EvaluateConfig
from posttrain.formatting import ChatFormat, record_messages
from posttrain.jsonl import read_instruction_rows, read_jsonl, write_jsonl
from posttrain.models import load_causal_lm, load_reward_model, load_tokenizer, pick_device, quiet_bitsandbytes
from posttrain.scoring import completion_scores, score_ids


class TokenLogits(LogitsProcessor):
    """Records, for every generated token, its logit and the top-k others of the same step, as the
    decoder saw them; changes nothing. The token chosen at a step shows up as the last input id of
    the next call, so its logit is read from the previous step's scores."""

    def __init__(self, k: int):
        self.k, self.previous, self.columns = k, None, []

    def _record(self, chosen: torch.Tensor) -> None:
        scores = self.previous.float()
        chosen_logit = scores.gather(1, chosen[:, None])
        others = scores.scatter(1, chosen[:, None], float("-inf")).topk(min(self.k, scores.shape[-1]) - 1, dim=-1).values
        self.columns.append(torch.cat([chosen_logit, others], dim=1).cpu())  # [batch, k], chosen first

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self._record(input_ids[:, -1])
        self.previous = scores
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, steps, k] once generation is over (`last_tokens`: the tokens of the last step)."""
        self._record(last_tokens)
        return torch.stack(self.columns, dim=1)


def _reply_length(tokens: list[int], stop_ids: list[int], pad_id: int) -> int:
    """Generated tokens up to and including the first stop token (the rest is padding)."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return position + 1
    return len(tokens)


@torch.no_grad()
def generate(model, chat: ChatFormat, records: list[dict], config: EvaluateConfig, sample: bool = False, top_k: int = 0) -> list[dict]:
    """Replies to `records` ({"prompt"[, "messages"]}): per record {"reply", "reply_ids"} and, with
    `top_k`, "logits" [tokens, top_k] (chosen token first). `sample`: config.samples samples each,
    returned as {"samples": [...], "sample_ids": [...]}."""
    tokenizer, device = chat.tokenizer, next(model.parameters()).device
    pad_id, stops = tokenizer.pad_token_id, chat.stop_token_ids
    per_batch = max(1, config.batch_size // config.samples) if sample else config.batch_size
    out = []
    for start in range(0, len(records), per_batch):
        failpoints.reach("generate")
        ids = chat.prompt_ids(records[start : start + per_batch])
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        keeper = TokenLogits(top_k) if top_k else None
        options = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": config.samples} if sample else {"do_sample": False}
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=stops,
            logits_processor=LogitsProcessorList([keeper]) if keeper else None,
            **options,
        )
        new = output[:, width:].tolist()
        if sample:
            for row in range(len(ids)):
                group = new[row * config.samples : (row + 1) * config.samples]
                replies = [tokens[: _reply_length(tokens, stops, pad_id)] for tokens in group]
                out.append({"samples": tokenizer.batch_decode(replies, skip_special_tokens=True), "sample_ids": replies})
            continue
        logits = keeper.finish(output[:, -1]) if keeper and new and new[0] else None  # [batch, steps, k]
        for row, tokens in enumerate(new):
            length = _reply_length(tokens, stops, pad_id)
            record = {"reply": tokenizer.decode(tokens[:length], skip_special_tokens=True), "reply_ids": tokens[:length]}
            if keeper:
                record["logits"] = logits[row, :length].numpy() if logits is not None else np.zeros((0, top_k), dtype=np.float32)
            out.append(record)
    return out


def reward_scores(reward_model, chat: ChatFormat, records: list[dict], replies: list[str], max_length: int) -> list[float]:
    """The reward model's score of each reply to its record's prompt (rendered with the chat template)."""
    if not records:
        return []
    rows = [{**record, "answer": reply} for record, reply in zip(records, replies)]
    parts = chat.split_replies(rows, reply_keys=("answer",))
    sequences = [p["prompt_ids"] + p["answer_ids"] for p in parts]
    return score_ids(reward_model, sequences, chat.tokenizer.pad_token_id, max_length).tolist()


def subset(items_by_task: dict[str, list[dict]], count: int) -> list[dict]:
    """`count` scored items taken round-robin over the tasks (in item order), so each task is in."""
    queues = [[item for item in items if item["split"] == "score"] for items in items_by_task.values()]
    chosen, position = [], 0
    while len(chosen) < count and any(position < len(queue) for queue in queues):
        chosen += [queue[position] for queue in queues if position < len(queue)][: count - len(chosen)]
        position += 1
    return chosen


def calibration_metrics(records: list[dict], config: EvaluateConfig) -> dict:
    """ECE before and after temperature scaling (fitted on the calibration split)."""
    fit = [r for r in records if r["split"] == "calibration"]
    scored = [r for r in records if r["split"] == "score"]
    temperature = m.fit_temperature([r["logits"] for r in fit], [r["correct"] for r in fit])
    before = [math.exp(m.sequence_logprob(r["logits"])) for r in scored]
    after = [math.exp(m.sequence_logprob(r["logits"], temperature)) for r in scored]
    correct = [r["correct"] for r in scored]
    return {
        "ece": m.expected_calibration_error(before, correct, config.ece_bins),
        "ece_scaled": m.expected_calibration_error(after, correct, config.ece_bins),
        "temperature": temperature,
        "calibration_items": len(fit),
        "_bins": {"before": m.reliability_bins(before, correct, config.ece_bins), "after": m.reliability_bins(after, correct, config.ece_bins)},
    }


def reliability_png(bins: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.2, 4.2))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for label, rows, style in (("before", bins["before"], "o-"), ("temperature-scaled", bins["after"], "s--")):
        points = [(row["confidence"], row["accuracy"]) for row in rows if row["count"]]
        if points:
            axis.plot(*zip(*points), style, label=label, markersize=4)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (sequence probability)", ylabel="accuracy", title=title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(config: EvaluateConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    out_dir = Path(out_dir)
    seed = config.seed if config.seed is not None else 0
    folder = Path(inputs["model"].path) / config.variant if config.variant else Path(inputs["model"].path)
    bench_dir = Path(inputs["benchmarks"].path)
    tasks = {name: BenchmarkTask.model_validate(spec) for name, spec in json.loads((bench_dir / "tasks.json").read_text()).items()}
    items = {name: read_jsonl(bench_dir / f"{name}.jsonl") for name in tasks}
    device = pick_device()
    tokenizer = load_tokenizer(folder)
    chat = ChatFormat(tokenizer)
    started = time.perf_counter()
    with quiet_bitsandbytes():  # bitsandbytes logs once per matmul on CPU
        # transformers loads bitsandbytes for a quantized variant; imported here, always, so its
        # version is in the key of every evaluate stage the same way (posttrain.closure).
        import bitsandbytes  # noqa: F401

        # Every model on the same device: left without a device_map, a plain model loads on the CPU
        # while transformers puts a bitsandbytes one on the GPU.
        model = load_causal_lm(folder, device_map={"": device})
        model.eval()
        vocab = model.get_output_embeddings().weight.shape[0]

        # -- generation ------------------------------------------------------------------
        generation_tasks = [name for name, task in tasks.items() if task.kind == "generation"]
        records: list[dict] = []
        for name in generation_tasks:
            replies = generate(model, chat, items[name], config, top_k=min(config.top_logits, vocab))
            for item, reply in zip(items[name], replies):
                answer = extract_answer(tasks[name], reply["reply"])
                records.append({**item, "reply": reply["reply"], "extracted": answer, "correct": answer == item["answer"], "logits": reply["logits"]})
        by_id = {record["id"]: record for record in records}
        sampled = subset({name: items[name] for name in generation_tasks}, config.sample_items)
        torch.manual_seed(seed)
        for item, drawn in zip(sampled, generate(model, chat, sampled, config, sample=True) if sampled else []):
            by_id[item["id"]]["samples"] = drawn["samples"]
            by_id[item["id"]]["sample_answers"] = [extract_answer(tasks[item["task"]], text) for text in drawn["samples"]]
        preference_records = []
        for name, task in tasks.items():
            if task.kind == "preference":
                scored = [item for item in items[name] if item["split"] == "score"]
                for item, reply in zip(scored, generate(model, chat, scored, config)):
                    preference_records.append({**item, "reply": reply["reply"]})
        generation_seconds = time.perf_counter() - started

        # -- the run's reward model, and the SFT eval split's completion loss ----------------
        completion = {}
        if "data" in inputs:
            rows = read_instruction_rows(Path(inputs["data"].path) / "instruction" / "eval.jsonl")[: config.loss_rows]
            if rows:
                max_length = min(getattr(model.config, "max_position_embeddings", 2048), 2048)
                loss, _ = completion_scores(model, chat.encode_rows(rows, max_length), tokenizer.pad_token_id)
                completion = {"completion_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    del model
    if "reward" in inputs:
        reward_model = load_reward_model(inputs["reward"].path).to(device)
        reward_model.config.pad_token_id = tokenizer.pad_token_id
        for record, score in zip(records, reward_scores(reward_model, chat, records, [r["reply"] for r in records], 2048)):
            record["reward"] = score
        for record, score in zip(preference_records, reward_scores(reward_model, chat, preference_records, [r["reply"] for r in preference_records], 2048)):
            record["reward"] = score
        for record in records:
            if "samples" in record:
                record["sample_rewards"] = reward_scores(reward_model, chat, [record] * len(record["samples"]), record["samples"], 2048)
        del reward_model

    # -- metrics ----------------------------------------------------------------------------
    results: dict[str, dict] = {}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    for name in generation_tasks:
        task_records = by_task[name]
        scored = [r for r in task_records if r["split"] == "score"]
        row = {"exact_match": sum(r["correct"] for r in scored) / len(scored), "items": len(scored)}
        row.update({k: v for k, v in calibration_metrics(task_records, config).items() if not k.startswith("_")})
        row.update(_scaling(task_records, config))
        if scored and "reward" in scored[0]:
            row["reward_mean"] = float(np.mean([r["reward"] for r in scored]))
        results[name] = row
    for name, task in tasks.items():
        if task.kind == "preference":
            rewards = [r["reward"] for r in preference_records if r["task"] == name and "reward" in r]
            results[name] = {"items": sum(r["task"] == name for r in preference_records), **({"reward_mean": float(np.mean(rewards))} if rewards else {})}
    mean = {"exact_match": float(np.mean([results[name]["exact_match"] for name in generation_tasks])) if generation_tasks else math.nan}
    pooled = calibration_metrics(records, config)
    mean.update({k: v for k, v in pooled.items() if not k.startswith("_")})
    mean.update(_scaling(records, config))
    mean.update(completion)
    if records and "reward" in records[0]:
        mean["reward_mean"] = float(np.mean([r["reward"] for r in records if r["split"] == "score"]))
    results["mean"] = mean

    # -- files ------------------------------------------------------------------------------
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))  # tasks in the config's order
    saved = [{k: v for k, v in r.items() if k != "logits"} for r in records] + preference_records
    write_jsonl(out_dir / "generations.jsonl", saved)
    # safetensors, not .npz: the file is byte-identical for the same logits (a zip carries its write time).
    save_file({r["id"]: np.ascontiguousarray(r["logits"], dtype=np.float32) for r in records if len(r["logits"])}, out_dir / "logits.safetensors")
    (out_dir / "reliability.json").write_text(json.dumps(pooled["_bins"], indent=2))
    if records:
        reliability_png(pooled["_bins"], out_dir / "reliability.png", f"{folder.name}: calibration (all tasks)")
    flat = {f"{task}.{metric}": round(value, 5) for task, row in results.items() for metric, value in row.items() if isinstance(value, (int, float)) and math.isfinite(value)}
    flat["generation_seconds"] = round(generation_seconds, 2)
    described = chat.describe(record_messages(items[generation_tasks[0]][0] if generation_tasks else {"prompt": ""}, None), add_generation_prompt=True)
    return Artifact.draft(out_dir, flat, chat_template=described, variant=config.variant)


def _scaling(records: list[dict], config: EvaluateConfig) -> dict:
    """Test-time scaling on the sampled items: greedy on the same items, and each curve."""
    sampled = [{**r, "answer": r["answer"]} for r in records if "sample_answers" in r]
    if not sampled:
        return {}
    row = {"greedy_on_subset": sum(r["correct"] for r in sampled) / len(sampled), "subset_items": len(sampled)}
    row.update({f"self_consistency_k{k}": v for k, v in m.curve(sampled, config.ks, "self_consistency").items()})
    if all("sample_rewards" in r for r in sampled):
        row.update({f"best_of_n_k{k}": v for k, v in m.curve(sampled, config.ks, "best_of_n").items()})
    return row


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, EvaluateConfig)
