"""Reward stage: train a scalar reward model on preference pairs with TRL's `RewardTrainer`.

    python -m tasks.reward --config '{"max_steps": 200}' \\
        --inputs '{"init": "artifacts/store/sft/<fp>", "data": "artifacts/store/data/<fp>"}' --out /tmp/rm

Inputs: `init` — a Hugging Face causal-LM folder (the SFT model or the base; the flow picks it) whose
body becomes the reward model's body under a fresh one-output `score` head; `data` — a data artifact
whose `preference/{train,eval}.jsonl` rows are `{"prompt", "chosen", "rejected"}`.

Output: a `AutoModelForSequenceClassification` folder (safetensors + tokenizer) whose logit for
the prompt and the answer, rendered with the model's chat template (the answer ending with its
end-of-turn token; posttrain.formatting.ChatFormat), scores the answer. The figure that matters is
held-out pairwise accuracy — the fraction of eval pairs where chosen scores above rejected — measured
here, by our own code, before and after training, so the gain over the untrained head is visible.
"""

from __future__ import annotations

from pathlib import Path


from data_contracts import check_preference_rows
from posttrain.artifacts import Artifact
from posttrain.config import RewardConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_preference_pairs
from posttrain.models import count_parameters, load_reward_model, load_tokenizer, save_pretrained
from posttrain.scoring import pair_ids, pairwise_metrics
from posttrain.training import ProgressCallback, last_logged, quiet, remove_scratch, trainer_defaults, write_loss_history

DATA_FILES = ("data_contracts/reward_tokenized.json",)  # the tokenized contract this stage runs before training


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
    model = load_reward_model(init_dir)
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
    args = TrlRewardConfig(
        **{
            **trainer_defaults(out_dir, seed),
            # A few log points even for short test runs; TRL averages accuracy/margin over each window.
            "logging_steps": max(1, min(10, config.max_steps // 10)),
        },
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(30, config.max_steps // 10),
        max_length=config.max_length,
    )
    progress = ProgressCallback("reward")
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=[progress]
    )
    quiet(trainer)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise ValueError(f"every preference pair is longer than reward.max_length={config.max_length} tokens")
    trainer.train()

    after = pairwise_metrics(trainer.model, pairs["eval"], eval_rows, tokenizer.pad_token_id, config.max_length, prefix="eval_")
    save_pretrained(trainer.model, tokenizer, out_dir)
    write_loss_history(out_dir, progress.loss_history, progress.history)
    remove_scratch(out_dir)

    metrics = {
        **progress.summary(),
        **before,
        **after,
        "eval_accuracy_gain": round(after["eval_accuracy"] - before["eval_before_accuracy"], 4),
        "train_pairs": kept,
        "train_pairs_dropped_too_long": len(train_rows) - kept,
        "eval_pairs": len(eval_rows),
        "parameters": count_parameters(trainer.model),
        "contract_expectations_passed": contract["passed"],
    }
    for key in ("accuracy", "margin"):
        value = last_logged(trainer.state.log_history, key)
        if value is not None:
            metrics[f"train_{key}"] = round(value, 4)
    return Artifact.draft(out_dir, metrics=metrics)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, RewardConfig)
