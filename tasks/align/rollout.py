"""Sampling and scoring tokens for the align methods: rollouts, their log-probs, and replay.

    rollout = sample(policy, chat, rows, per_prompt=16, temperature=1.2, max_new_tokens=16)
    logp, entropy = token_logprobs(policy, rollout, temperature)         # [N, R] each
    loss = replay.nll(policy)                                            # SFT rows of every skill

PPO and GRPO sample their rollouts here; DPO samples its on-policy pairs here, and all three replay
SFT rows through `Replay`. What only the RL loops need (rewards of a rollout, per-step figures, the
hacking verdict, the curves) is in tasks/align/rl.py.

A rollout holds N sequences: the prompt rendered with the model's chat template (left-padded to a
common width P) followed by up to R sampled reply tokens, cut after the first stop token (EOS or
the template's end-of-turn). `response_mask` marks the reply tokens, the stop token included.
Log-probabilities are computed at the sampling temperature, so the policy ratio and the KL compare
the distribution the samples were really drawn from. Positions follow the attention mask, as
generation numbered them under left padding.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from posttrain.formatting import IGNORE_INDEX, ChatFormat, pad_batch
from posttrain.training import random_state, set_random_state


@dataclass
class Rollout:
    rows: list[dict]  # the prompt row of each sequence
    sequences: torch.Tensor  # [N, P + R] prompt (left-padded) + reply (right-padded)
    attention_mask: torch.Tensor  # [N, P + R]
    response_mask: torch.Tensor  # [N, R] float: reply tokens, the stop token included
    prompt_width: int
    replies: list[str]
    ended: list[bool]  # a stop token ended the reply (else it ran out of max_new_tokens)
    seconds: float

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    def generated_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def prompt_and_reply_ids(self) -> list[list[int]]:
        """Per sequence the unpadded prompt + reply ids (what a reward model scores)."""
        out = []
        for row in range(self.sequences.shape[0]):
            ids = self.sequences[row][self.attention_mask[row].bool()]
            out.append(ids.tolist())
        return out


@torch.no_grad()
def sample(policy, chat: ChatFormat, rows: list[dict], per_prompt: int, temperature: float, max_new_tokens: int) -> Rollout:
    """`per_prompt` replies to each row, sampled at `temperature` (no top-k/top-p: the true distribution)."""
    started = time.perf_counter()
    was_training = policy.training
    policy.eval()
    tokenizer, device = chat.tokenizer, next(policy.parameters()).device
    pad_id, stops = tokenizer.pad_token_id, chat.stop_token_ids
    prompt_ids = chat.prompt_ids(rows)
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    output = policy.generate(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=per_prompt,
        pad_token_id=pad_id,
        eos_token_id=stops,
    )
    policy.train(was_training)
    replies = output[:, width:]
    is_stop = torch.zeros_like(replies, dtype=torch.bool)
    for stop in stops:
        is_stop |= replies == stop
    # Reply tokens: everything up to and including the first stop token.
    before_stop = (is_stop.cumsum(-1) - is_stop.long()) == 0
    response_mask = before_stop.float()
    ended = is_stop.any(-1).tolist()
    texts = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(replies, response_mask)], skip_special_tokens=True)
    prompt_mask = prompt_mask.repeat_interleave(per_prompt, dim=0)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    sequences = torch.where(attention_mask.bool(), output, torch.full_like(output, pad_id))
    expanded_rows = [row for row in rows for _ in range(per_prompt)]
    return Rollout(expanded_rows, sequences, attention_mask, response_mask, width, texts, ended, time.perf_counter() - started)


def token_logprobs(model, rollout: Rollout, temperature: float, with_entropy: bool = False):
    """Log-probability of each reply token under `model` at `temperature` ([N, R]), and its entropy."""
    logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids).logits
    width = rollout.prompt_width
    logits = logits[:, width - 1 : -1].float() / temperature  # position t predicts token t + 1
    log_probs = F.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy


@torch.no_grad()
def sampled_kl(policy, reference, chat: ChatFormat, rows: list[dict], max_new_tokens: int, temperature: float = 1.0) -> float:
    """KL(π‖π_ref) per reply, estimated on one reply per row sampled from the policy: the mean over
    replies of Σ_t log π − log π_ref (the estimator PPO's penalty uses). What "it trained" means
    for a method without rollouts of its own (DPO)."""
    rollout = sample(policy, chat, rows, 1, temperature, max_new_tokens)
    logp, _ = token_logprobs(policy, rollout, temperature)
    ref_logp, _ = token_logprobs(reference, rollout, temperature)
    return float(((logp - ref_logp) * rollout.response_mask).sum(-1).mean())


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean) / std over the masked entries (unbiased variance, as verl and OpenRLHF)."""
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum()
    variance = ((centred**2) * mask).sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


class Replay:
    """Instruction rows of every skill, replayed as an NLL term so that RL on the targeted skills
    does not erase what SFT taught the others (the term the align study switches off)."""

    def __init__(self, chat: ChatFormat, rows: list[dict], batch_rows: int, max_length: int, seed: int):
        self.examples = [e for e in chat.encode_rows(rows, max_length) if any(label != IGNORE_INDEX for label in e["labels"][1:])]
        self.batch_rows, self.pad_id = batch_rows, chat.tokenizer.pad_token_id
        self.random = random.Random(seed)

    def state_dict(self) -> dict:
        return {"random": random_state(self.random)}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.random, state["random"])

    def nll(self, model) -> torch.Tensor:
        batch = pad_batch(self.random.sample(self.examples, min(self.batch_rows, len(self.examples))), self.pad_id)
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def cosine_schedule(optimizer, steps: int):
    """A short linear warm-up, then cosine decay to zero over the stage's steps — per rollout step.
    The SFT model ends its own schedule at a learning rate near zero: restarting at a constant rate
    first knocks it off the minimum it annealed into, and the decay settles it back."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(10, steps // 10), num_training_steps=steps)


class PromptSampler:
    """Prompt rows in shuffled epochs, so every row is used before any repeats."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.random, self.queue = rows, random.Random(seed), []  # the queue holds row positions

    def take(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            if not self.queue:
                # The same permutation `sample(self.rows, n)` draws, as positions (a checkpoint keeps them).
                self.queue = self.random.sample(range(len(self.rows)), len(self.rows))
            out.append(self.rows[self.queue.pop()])
        return out

    def state_dict(self) -> dict:
        return {"random": random_state(self.random), "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.random, state["random"])
        self.queue = list(state["queue"])


def select(rollout, index: torch.Tensor):
    """The sequences of `rollout` at `index` (a minibatch)."""
    return replace(
        rollout,
        rows=[rollout.rows[i] for i in index.tolist()],
        sequences=rollout.sequences[index],
        attention_mask=rollout.attention_mask[index],
        response_mask=rollout.response_mask[index],
        replies=[rollout.replies[i] for i in index.tolist()],
        ended=[rollout.ended[i] for i in index.tolist()],
    )
