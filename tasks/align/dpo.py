"""DPO align branch: tune the SFT model on preference pairs with TRL's `DPOTrainer`.

    python -m tasks.align.dpo --config '{"beta": 0.1, "max_steps": 150}' \\
        --inputs '{"sft": "artifacts/store/sft/<fp>", "data": "artifacts/store/data/<fp>"}' --out /tmp/dpo

Inputs: `sft` — a Hugging Face causal-LM folder, both the policy's starting point and the frozen
reference; `data` — a data artifact whose `preference/{train,eval}.jsonl` rows are
`{"prompt", "chosen", "rejected"}`. DPO takes no reward model: retraining the reward stage never
changes this stage's result.

Options: `loss_type` sigmoid (DPO) or ipo (IPO's squared loss); `reference` precompute (score every
pair once with the frozen SFT model) or model (a reference forward per step), auto picks; `pairs`
data (the preference rows: generated "plausible wrong" answers on the demo) or on_policy — the SFT
model's own wrong samples on the prompt rows (`prompt/train.jsonl`, which carry the answer) against
the correct answer, so DPO pushes down exactly the mistakes this model makes. Two NLL terms keep
what SFT taught: `sft_weight` on the chosen answers (RPO) and `replay_weight` on replayed SFT rows
of every skill.

Output: the aligned causal LM (safetensors + tokenizer). Figures: TRL's last logged
`rewards/accuracies` and `rewards/margins` on the training batches, and our own held-out measure on
`preference/eval.jsonl`: the implicit reward β·(log π(y|x) − log π_ref(y|x)), summed over completion
tokens, ranks chosen above rejected in what fraction of pairs (0.5 before training — every reward is
0 and ties count half). Because a too-high learning rate can raise that accuracy while pushing the
likelihood of the correct answers down (and with it the skills SFT taught), we also report the
policy's own preference (log π(chosen) > log π(rejected)) and the mean log-prob of the chosen
answers, before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from data_contracts import check_preference_rows
from posttrain.artifacts import Artifact
from posttrain.config import DpoConfig
from posttrain.formatting import IGNORE_INDEX, ChatFormat, pad_batch, parse_completion
from posttrain.jsonl import read_instruction_rows, read_jsonl, read_preference_pairs
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer, save_pretrained
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
from tasks.align.rollout import Replay, sample, sampled_kl

SCORE_BATCH = 64  # sequences per forward when scoring; inference only
KL_PROMPTS = 256  # held-out prompts the final KL to the reference is estimated on
DATA_FILES = ("data_contracts/dpo_tokenized.json",)  # the tokenized contract this stage runs before training


@torch.no_grad()
def reply_logps(model, prompt_ids: list[list[int]], reply_ids: list[list[int]], pad_id: int, max_length: int) -> torch.Tensor:
    """Sum of log-probs of each reply (its tokens and its end-of-turn token) given its prompt, cut
    at max_length from the end as DPO's collator cuts them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(prompt_ids), SCORE_BATCH):
        examples = []
        for prompt, reply in zip(prompt_ids[start : start + SCORE_BATCH], reply_ids[start : start + SCORE_BATCH]):
            ids = (prompt + reply)[:max_length]
            examples.append({"input_ids": ids, "labels": ([IGNORE_INDEX] * len(prompt) + reply)[:max_length]})
        batch = {key: value.to(device) for key, value in pad_batch(examples, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]  # token t is predicted from position t-1
        mask = labels != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.append((token_logps * mask).sum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(sums)


def pair_logps(model, parts: list[dict], pad_id: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reply log-probs of pairs split by ChatFormat.split_replies."""
    prompts = [pair["prompt_ids"] for pair in parts]
    chosen = reply_logps(model, prompts, [pair["chosen_ids"] for pair in parts], pad_id, max_length)
    rejected = reply_logps(model, prompts, [pair["rejected_ids"] for pair in parts], pad_id, max_length)
    return chosen, rejected


class EncodedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs posttrain.formatting already encoded (`prompt_ids`, `chosen_ids`,
    `rejected_ids`): TRL would render them again and, for text that is not a chat, append EOS.
    With a `replay` (tasks/align/rollout.Replay), each training step adds its NLL on SFT rows."""

    replay = None
    replay_weight = 0.0

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # What TRL's own preparation does after tokenizing (keep_start truncation): a prompt that
        # fills max_length leaves no reply token to learn from.
        return dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.replay is None or not model.training:
            return result
        extra = self.replay_weight * self.replay.nll(model)
        return (result[0] + extra, result[1]) if return_outputs else result + extra


REPLAY_STATE = "replay_rng.json"  # the replay sampler's position, beside each checkpoint


class ReplayCheckpoint(TrainerCallback):
    """Saves the replay sampler's RNG into each checkpoint the trainer writes, so a resumed run
    draws the replay rows an uninterrupted one would (the trainer restores its own data position)."""

    def __init__(self, replay: Replay):
        self.replay = replay

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / REPLAY_STATE).write_text(json.dumps(self.replay.state_dict()))

    @staticmethod
    def restore(replay: Replay, checkpoint: str) -> None:
        replay.load_state_dict(json.loads((Path(checkpoint) / REPLAY_STATE).read_text()))


def on_policy_pairs(model, chat: ChatFormat, rows: list[dict], samples: int, temperature: float, seed: int) -> list[dict]:
    """Pairs from the model's own mistakes: for each prompt row, its distinct wrong sampled answers
    (at most two) as `rejected` against the row's correct `answer` as `chosen`. Rows the model
    always gets right give no pair."""
    torch.manual_seed(seed)
    pairs = []
    for start in range(0, len(rows), SCORE_BATCH):
        chunk = rows[start : start + SCORE_BATCH]
        rollout = sample(model, chat, chunk, samples, temperature, max_new_tokens=32)
        for index, row in enumerate(chunk):
            wrong = []
            for reply in rollout.replies[index * samples : (index + 1) * samples]:
                answer = parse_completion(reply)
                if answer and answer != row["answer"].strip() and answer not in wrong:
                    wrong.append(answer)
            pairs += [{**{k: v for k, v in row.items() if k != "answer"}, "chosen": row["answer"], "rejected": answer} for answer in wrong[:2]]
    return pairs


def win_rate(difference: torch.Tensor) -> float:
    """Fraction of positive entries, ties counting half (so identical policy and reference give 0.5)."""
    return round(((difference > 0).float() + 0.5 * (difference == 0).float()).mean().item(), 4)


def held_out_metrics(reference: tuple, policy: tuple, beta: float, prefix: str) -> dict:
    """Implicit-reward accuracy/margin of `policy` against `reference`, plus the policy's own preference."""
    ref_chosen, ref_rejected = reference
    chosen, rejected = policy
    implicit_margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return {
        f"{prefix}implicit_reward_accuracy": win_rate(implicit_margin),
        f"{prefix}implicit_reward_margin": round(implicit_margin.mean().item(), 4),
        f"{prefix}preference_accuracy": win_rate(chosen - rejected),
        f"{prefix}chosen_logp": round(chosen.mean().item(), 4),
        f"{prefix}rejected_logp": round(rejected.mean().item(), 4),
    }


def run(config: DpoConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    out_dir = Path(out_dir)
    seed = config.seed if config.seed is not None else 0  # the flow fills in the pipeline's seed
    data_dir = Path(inputs["data"].path)
    eval_rows = read_preference_pairs(data_dir / "preference" / "eval.jsonl")
    sft_dir = Path(inputs["sft"].path)
    tokenizer = load_tokenizer(sft_dir)
    set_seed(seed)
    if config.pairs == "on_policy":
        prompt_file = data_dir / "prompt" / "train.jsonl"
        prompt_rows = [row for row in read_jsonl(prompt_file) if isinstance(row.get("answer"), str)] if prompt_file.is_file() else []
        if not prompt_rows:
            raise ValueError(f"{prompt_file}: align.dpo.pairs on_policy needs prompt rows with an `answer`")
        sampler = load_causal_lm(sft_dir, dtype="float32")
        train_rows = on_policy_pairs(sampler, ChatFormat(tokenizer), prompt_rows, config.on_policy_samples, config.on_policy_temperature, seed)
        del sampler
        if not train_rows:
            raise ValueError(f"{prompt_file}: the SFT model answered every prompt row right in every sample; no on-policy pair to learn from")
    else:
        train_rows = read_preference_pairs(data_dir / "preference" / "train.jsonl")
    # Encoded once with the chat template; the tokenized contract checks these ids before the first
    # step (DPO truncates at max_length), and the trainer gets them as they are.
    records = {"train": train_rows, "eval": eval_rows}
    parts = {split: ChatFormat(tokenizer).split_replies(rows) for split, rows in records.items()}
    contract = check_preference_rows("dpo", records, parts, config.max_length, out_dir, overlong="truncated")
    # fp32 weights: on a GPU the trainer's bf16 autocast still gives the speed; optimizer state stays exact.
    policy = load_causal_lm(sft_dir, dtype="float32")

    # The reference is the SFT model, frozen. When training visits every pair at least once, scoring each
    # pair once up front (TRL's precompute, with the untouched policy) is cheaper than a reference forward
    # per step (measured: 0.038 vs 0.055 s/step at batch 32) and needs no second model in memory.
    # Otherwise the reference is loaded explicitly from the same folder: left to itself, DPOTrainer
    # rebuilds it from config._name_or_path, which fails for a model built from a config (FIELD_NOTES).
    precompute = config.max_steps * config.batch_size >= len(train_rows) if config.reference == "auto" else config.reference == "precompute"
    reference = None if precompute else load_causal_lm(sft_dir, dtype="float32").requires_grad_(False)

    # Before any step the policy *is* the reference: its log-probs are the reference's on the eval pairs.
    eval_reference = pair_logps(policy, parts["eval"], tokenizer.pad_token_id, config.max_length)
    before = held_out_metrics(eval_reference, eval_reference, config.beta, prefix="eval_before_")

    train_dataset = Dataset.from_list(parts["train"])
    logging_steps = max(1, min(10, config.max_steps // 10))
    replayed = config.replay_weight > 0
    checkpoints, resume_from = checkpointing(config.checkpoint_every, logging_steps, config.max_steps, required=(REPLAY_STATE,) if replayed else ())
    args = DPOConfig(
        **{
            **trainer_defaults(out_dir, seed),
            "logging_steps": logging_steps,
            **checkpoints,
        },
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, config.max_steps // 10),
        beta=config.beta,
        # RPO: DPO alone lowers the likelihood of the chosen answers too and, on the demo, erased skills
        # SFT had taught; TRL's "sft" loss adds the chosen answers' NLL with this weight.
        loss_type=[config.loss_type, "sft"] if config.sft_weight > 0 else [config.loss_type],
        loss_weights=[1.0, config.sft_weight] if config.sft_weight > 0 else None,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=max(SCORE_BATCH, config.batch_size),
        max_length=config.max_length,
    )
    progress = ProgressCallback("dpo")
    trainer = EncodedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[progress],
    )
    if replayed:
        trainer.replay = Replay(ChatFormat(tokenizer), read_instruction_rows(data_dir / "instruction" / "train.jsonl"), config.replay_rows, config.max_length, seed)
        trainer.replay_weight = config.replay_weight
        trainer.add_callback(ReplayCheckpoint(trainer.replay))
        if resume_from is not None:
            ReplayCheckpoint.restore(trainer.replay, resume_from)
    quiet(trainer)
    trainer.train(resume_from_checkpoint=resume_from)

    eval_policy = pair_logps(trainer.model, parts["eval"], tokenizer.pad_token_id, config.max_length)
    reference_model = reference if reference is not None else load_causal_lm(sft_dir, dtype="float32")
    torch.manual_seed(seed)
    final_kl = sampled_kl(trainer.model, reference_model.eval(), ChatFormat(tokenizer), eval_rows[:KL_PROMPTS], max_new_tokens=32)
    after = held_out_metrics(eval_reference, eval_policy, config.beta, prefix="eval_")
    save_pretrained(trainer.model, tokenizer, out_dir)
    write_loss_history(out_dir, logged_losses(trainer))  # those before a resume too
    remove_scratch(out_dir)

    summary = progress.summary()
    metrics = {
        **summary,
        "reference_precomputed": int(precompute),
        "resumed_from_step": resumed_step(resume_from),
        "seconds_per_step": round(summary["train_seconds"] / max(summary["train_steps"], 1), 4),
        **before,  # implicit reward before training: 0.5 accuracy, 0 margin by construction (the chance line)
        **after,
        "eval_chosen_logp_change": round(after["eval_chosen_logp"] - before["eval_before_chosen_logp"], 4),
        "final_kl": round(final_kl, 5),
        "train_pairs": len(trainer.train_dataset),
        "on_policy_pairs": int(config.pairs == "on_policy"),
        "eval_pairs": len(eval_rows),
        "parameters": count_parameters(trainer.model),
        "contract_expectations_passed": contract["passed"],
    }
    for logged, name in (("rewards/accuracies", "train_rewards_accuracy"), ("rewards/margins", "train_rewards_margin")):
        value = last_logged(trainer.state.log_history, logged)
        if value is not None:
            metrics[name] = round(value, 4)
    return Artifact.draft(out_dir, metrics=metrics, history=progress.history)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, DpoConfig)
