"""Reward stage: train a scalar reward model on preference pairs with TRL's `RewardTrainer`.

    python -m tasks.reward --config '{"max_steps": 200}' \\
        --inputs '{"init": "artifacts/store/sft/<fp>", "data": "artifacts/store/data/<fp>"}' --out /tmp/rm

Inputs: `init` — a Hugging Face causal-LM folder (the SFT model or the base; the flow picks it) whose
body becomes the reward model's body under a fresh one-output `score` head; `data` — a data artifact
whose `preference/{train,eval}.jsonl` rows are `{"prompt", "chosen", "rejected"}`.

Output: a `AutoModelForSequenceClassification` folder (safetensors + tokenizer) whose logit for
the prompt and the answer, rendered with the model's chat template (the answer ending with its
end-of-turn token; posttrain.formatting.ChatFormat), scores the answer. `head: classifier` (the
default) reads it from a one-output head on the last token; `head: likelihood` keeps the causal LM
whole and scores a·Σ_t log p(x_t | x_<t) + b (posttrain.models.LikelihoodRewardModel, registered
with the Auto classes; `reference: true` subtracts a frozen copy of the init's log-likelihood, DPO's
implicit reward). Both train through the same RewardTrainer Bradley–Terry loss. The figure that matters is
held-out pairwise accuracy — the fraction of eval pairs where chosen scores above rejected — measured
here, by our own code, before and after training, so the gain over the untrained head is visible,
with its 95 % Wilson interval. Beside it: how well the Bradley–Terry probability
P(chosen > rejected) = σ(r_chosen − r_rejected) is calibrated (ECE over 10 bins), and margins.png,
the histogram of held-out margins with the reliability of that probability.

`method: lora` trains a LoRA adapter on the body (peft, task SEQ_CLS, so the score head trains
fully) and merges it before saving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_contracts import check_preference_rows
from posttrain.artifacts import Artifact
from posttrain.config import RewardConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_preference_pairs
from posttrain.models import build_reward_model, count_parameters, load_tokenizer, save_pretrained
from posttrain.scoring import margin_metrics, pair_ids, pair_margins, pairwise_metrics
from posttrain.training import (
    ProgressCallback,
    checkpointing,
    last_logged,
    logged_losses,
    quiet,
    remove_scratch,
    resumed_step,
    trainer_defaults,
    write_loss_history,
)

DATA_FILES = ("data_contracts/reward_tokenized.json",)  # the tokenized contract this stage runs before training


def _lora_config(config: RewardConfig):
    from peft import LoraConfig

    # SEQ_CLS trains the `score` module fully (both heads name it so); the likelihood head's frozen
    # reference copy gets no adapter.
    exclude = r"ref\..*" if config.head == "likelihood" and config.reference else None
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules, task_type="SEQ_CLS", exclude_modules=exclude)


def margin_figures(margins: torch.Tensor, png: Path) -> dict:
    """The accuracy's 95 % Wilson interval, the ECE of σ(margin) as P(chosen > rejected), and a PNG:
    the margin histogram beside the reliability diagram of that probability."""
    from posttrain.metrics import expected_calibration_error, reliability_bins, wilson_interval

    probability = torch.sigmoid(margins).tolist()
    # The favoured reply's probability is the confidence; it is right when the favoured reply is the chosen one.
    confidence = [max(p, 1 - p) for p in probability]
    correct = [p > 0.5 for p in probability]
    low, high = wilson_interval(sum(correct), len(correct))
    figures = {
        "eval_ci95_low": round(low, 4),
        "eval_ci95_high": round(high, 4),
        "eval_preference_ece": round(expected_calibration_error(confidence, correct, 10), 4),
        "eval_margin_median": round(float(margins.median()), 4),
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (histogram, reliability) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    histogram.hist(margins.tolist(), bins=40, color="tab:blue")
    histogram.axvline(0, color="grey", linestyle=":")
    histogram.set(xlabel="r(chosen) − r(rejected)", ylabel="held-out pairs", title="reward margins")
    rows = [row for row in reliability_bins(confidence, correct, 10) if row["count"]]
    reliability.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":")
    reliability.plot([row["confidence"] for row in rows], [row["accuracy"] for row in rows], "o-")
    reliability.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="σ(margin) of the favoured reply", ylabel="fraction right", title=f"calibration (ECE {figures['eval_preference_ece']:.3f})")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return figures


def run(config: RewardConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    out_dir = Path(out_dir)
    seed = config.seed if config.seed is not None else 0  # the flow fills in the pipeline's seed
    data_dir = Path(inputs["data"].path)
    train_rows = read_preference_pairs(data_dir / "preference" / "train.jsonl")
    eval_rows = read_preference_pairs(data_dir / "preference" / "eval.jsonl")

    init_dir = Path(inputs["init"].path)
    tokenizer = load_tokenizer(init_dir)
    chat = ChatFormat(tokenizer)
    set_seed(seed)  # the score head is freshly initialised: make it reproducible
    model = build_reward_model(init_dir, config.head, config.reference)
    # The classifier finds each sequence's last real token through pad_token_id; base configs often lack it.
    model.config.pad_token_id = tokenizer.pad_token_id

    # Encoded once with the chat template; the tokenized contract checks these very ids before the
    # first step (RewardTrainer drops pairs longer than max_length), and the trainer gets them as they are.
    records = {"train": train_rows, "eval": eval_rows}
    parts = {split: chat.split_replies(rows) for split, rows in records.items()}
    contract = check_preference_rows("reward", records, parts, config.max_length, out_dir, overlong="dropped")
    pairs = {split: pair_ids(split_parts) for split, split_parts in parts.items()}
    before = pairwise_metrics(model, pairs["eval"], eval_rows, tokenizer.pad_token_id, config.max_length, prefix="eval_before_")

    train_dataset = Dataset.from_list(pairs["train"])
    # A few log points even for short test runs; TRL averages accuracy/margin over each window.
    checkpoints, resume_from = checkpointing(config.checkpoint_every, max(1, min(10, config.max_steps // 10)), config.max_steps)
    args = TrlRewardConfig(
        **{**trainer_defaults(out_dir, seed), "logging_steps": max(1, min(10, config.max_steps // 10)), **checkpoints},
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(30, config.max_steps // 10),
        max_length=config.max_length,
    )
    progress = ProgressCallback("reward")
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=[progress],
        peft_config=_lora_config(config) if config.method == "lora" else None,
    )
    quiet(trainer)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise ValueError(f"every preference pair is longer than reward.max_length={config.max_length} tokens")
    trainer.train(resume_from_checkpoint=resume_from)

    trained = trainer.model.merge_and_unload() if config.method == "lora" else trainer.model
    margins = pair_margins(trained, pairs["eval"], tokenizer.pad_token_id, config.max_length)
    after = margin_metrics(margins, eval_rows, prefix="eval_")
    calibration = margin_figures(margins, out_dir / "margins.png")
    save_pretrained(trained, tokenizer, out_dir)
    write_loss_history(out_dir, logged_losses(trainer))
    remove_scratch(out_dir)

    metrics = {
        **progress.summary(),
        **before,
        **after,
        "eval_accuracy_gain": round(after["eval_accuracy"] - before["eval_before_accuracy"], 4),
        "optimizer_steps": trainer.state.global_step,
        "resumed_from_step": resumed_step(resume_from),
        **calibration,
        "train_pairs": kept,
        "train_pairs_dropped_too_long": len(train_rows) - kept,
        "eval_pairs": len(eval_rows),
        "parameters": count_parameters(trained),
        "contract_expectations_passed": contract["passed"],
    }
    for key in ("accuracy", "margin"):
        value = last_logged(trainer.state.log_history, key)
        if value is not None:
            metrics[f"train_{key}"] = round(value, 4)
    return Artifact.draft(out_dir, metrics=metrics, history=progress.history)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, RewardConfig)
