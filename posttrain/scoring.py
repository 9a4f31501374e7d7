"""Score a causal LM on completion tokens: the held-out loss every training stage reports.

    loss, predictions = completion_scores(model, examples, pad_id)   # examples from ChatFormat.encode_rows
    rewards = score_ids(reward_model, [prompt_ids + reply_ids, ...], pad_id, max_length)
    pairwise_metrics(reward_model, pair_ids(chat.split_replies(rows)), rows, pad_id, max_length, prefix="eval_")

SFT (loss before/after), distillation (student vs teacher, argmax agreement), quantization (loss
change, agreement with the source) and evaluation all measure with `completion_scores`, so their
figures are comparable: mean cross-entropy per completion token, prompt tokens excluded by the
loss mask. `score_ids` is the reward model's score of token sequences (reward, evaluate), and
`pairwise_metrics` its held-out pairwise accuracy (the reward stage, and the report on the
preference benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain import formatting

REWARD_BATCH = 64  # sequences per reward-model forward; inference only


def length_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first into batches of at most `max_rows` rows and `max_tokens`
    padded tokens (one over-long row still gets a batch of its own)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[index] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def completion_scores(model, examples: list[dict], pad_id: int, batch_size: int = 64, max_tokens: int = 16384) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy per completion token, and the model's argmax at every completion position."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    # Batches of similar length pad little (on Alpaca lengths ~2x less work than file order), and a
    # token budget bounds the logits' memory on a real vocabulary; the predictions go back to the
    # examples' order, so two models' argmaxes still line up.
    per_example: list[torch.Tensor | None] = [None] * len(examples)
    for chunk in length_batches([len(example["input_ids"]) for example in examples], batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in formatting.pad_batch([examples[index] for index in chunk], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1].float()
        # Position t predicts token t+1: score where the NEXT token is a completion token.
        mask = batch["labels"][:, 1:] != formatting.IGNORE_INDEX
        selected = logits[mask]
        total_loss += F.cross_entropy(selected, batch["labels"][:, 1:][mask], reduction="sum").item()
        total_tokens += selected.shape[0]
        argmax = logits.argmax(-1).cpu()
        for row, index in enumerate(chunk):
            per_example[index] = argmax[row][mask[row].cpu()]
    predictions = [tensor for tensor in per_example if tensor is not None]
    return total_loss / max(total_tokens, 1), torch.cat(predictions) if predictions else torch.empty(0)


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_id: int, max_length: int) -> torch.Tensor:
    """One reward per token sequence. Right padding: the classifier reads the last non-pad token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), REWARD_BATCH):
        chunk = [ids[:max_length] for ids in sequences[start : start + REWARD_BATCH]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores)


def pair_ids(parts: list[dict]) -> list[dict]:
    """Per pair the token ids RewardTrainer scores, from ChatFormat.split_replies: prompt + chosen
    reply and prompt + rejected reply (each reply ends with its end-of-turn token)."""
    return [{"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"]} for p in parts]


def pair_margins(model, pairs: list[dict], pad_id: int, max_length: int) -> torch.Tensor:
    """r(chosen) − r(rejected) for each pair."""
    chosen = score_ids(model, [pair["chosen_ids"] for pair in pairs], pad_id, max_length)
    rejected = score_ids(model, [pair["rejected_ids"] for pair in pairs], pad_id, max_length)
    return chosen - rejected


def pairwise_metrics(model, pairs: list[dict], rows: list[dict], pad_id: int, max_length: int, prefix: str) -> dict:
    """Accuracy (chosen > rejected), mean margin, and accuracy per skill where rows carry one."""
    return margin_metrics(pair_margins(model, pairs, pad_id, max_length), rows, prefix)


def margin_metrics(margins: torch.Tensor, rows: list[dict], prefix: str) -> dict:
    """pairwise_metrics from margins already scored."""
    wins = (margins > 0).float()
    metrics = {
        f"{prefix}accuracy": round(wins.mean().item(), 4),
        f"{prefix}margin": round(margins.mean().item(), 4),
    }
    skills = sorted({row["skill"] for row in rows if isinstance(row.get("skill"), str)})
    for skill in skills:
        mask = torch.tensor([row.get("skill") == skill for row in rows])
        metrics[f"{prefix}accuracy_{skill}"] = round(wins[mask].mean().item(), 4)
    return metrics
