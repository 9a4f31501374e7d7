"""Distillation stage: train a smaller student on a teacher's logits.

    run(DistillConfig(max_steps=1500), {"teacher": sft, "data": data}, out_dir)
    python -m tasks.distill --config distill.json --inputs inputs.json --out DIR

The teacher is any model of the run (`distill.teacher`, wired by flows/plan.py): sft, base, an
aligned branch (align-dpo, align-ppo, align-grpo), or the gate's candidate, in which case the flow
runs this stage after the per-model evaluations and the student is not eligible as the candidate.

The teacher runs ONCE, before training, over every training row the student will see; only its
top-k logits per completion position are kept (float16 values; int16 token ids, int32 for
vocabularies over 32k). Running the teacher inside the training loop ate a third of the student's
steps (FIELD_NOTES). The student then trains with a plain PyTorch loop (AdamW, warm-up + cosine,
gradient clipping at 1.0) on completion tokens:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher || q_student)

where p_teacher is the softmax of the teacher's top-k logits at temperature T, and q_student the
student's log-softmax at temperature T restricted to (renormalised over) the same k token ids. T^2
keeps the gradient scale of the soft term independent of T (Hinton et al.). `alpha: 1` is the
plain-SFT control FIELD_NOTES asks every distillation to be compared against; the teacher is then
only run for the eval figures.

Only the rows the steps reach are encoded (steps x batch, in chunks of 256, from the data stage's
seeded hash order), and the eval figures use the first `eval_rows` eval rows, so a short run on a
big corpus costs what its steps cost. Every `checkpoint_every` steps the loop saves the student,
AdamW, the schedule, the RNG and its losses (posttrain.training.LoopCheckpoints); a later run of
the same work resumes from the newest and ends with the weights of an uninterrupted run.

The student shares the teacher's tokenizer (same vocabulary, so their logits line up): a tiny
Llama built with posttrain.models.build_tiny when the teacher is one, otherwise the teacher's own
config class with the student's smaller dimensions. Output: the student (safetensors + tokenizer)
and loss_history.json. Metrics: both models' sizes and eval-split completion loss, the student's
top-1 agreement with the teacher before and after training, teacher pre-compute and training times.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from data_contracts import check_instruction_rows
from posttrain import failpoints, formatting
from posttrain.artifacts import Artifact
from posttrain.config import DistillConfig, StudentConfig, TinyModelConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_instruction_rows
from posttrain.models import (
    build_tiny,
    count_parameters,
    folder_size_bytes,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    save_pretrained,
)
from posttrain.scoring import completion_scores
from posttrain.training import LoopCheckpoints, Throughput, write_loss_history

IGNORE = formatting.IGNORE_INDEX
DATA_FILES = ("data_contracts/distill_tokenized.json",)  # the tokenized contract this stage runs before training


# ----------------------------------------------------------------------------- inputs


def _input_dir(inputs: dict[str, Artifact], name: str) -> Path:
    if name not in inputs:
        raise ValueError(f"distill: missing input {name!r} (expected: teacher, data)")
    return Path(inputs[name].path)



def trainable(examples: list[dict]) -> list[dict]:
    """The encoded rows that keep a completion token within max_length (the others have no
    completion position to learn from)."""
    return [example for example in examples if any(label != IGNORE for label in example["labels"][1:])]


def encode_until_trainable(chat: ChatFormat, rows: list[dict], max_length: int, needed: int) -> tuple[list[dict], list[dict]]:
    """The first rows, and their encodings, until `needed` of them are trainable (or the rows run out:
    then all of them, and the schedule runs several epochs)."""
    used, encoded, kept = 0, [], 0
    while used < len(rows) and kept < needed:
        chunk = chat.encode_rows(rows[used : used + max(needed - kept, 256)], max_length)
        encoded += chunk
        used += len(chunk)
        kept += len(trainable(chunk))
    return rows[:used], encoded


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose NEXT token is a completion token: where logits[:, :-1] are scored."""
    return labels[:, 1:] != IGNORE


# ----------------------------------------------------------------------------- the student


def build_student(teacher, tokenizer, student: StudentConfig, seed: int):
    """A freshly initialised model with the teacher's vocabulary and the student's dimensions."""
    if student.hidden_size % student.num_heads:
        raise ValueError(
            f"distill.student: hidden_size {student.hidden_size} is not divisible by num_heads {student.num_heads}"
        )
    teacher_config = teacher.config
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if teacher_config.model_type == "llama" and vocab == len(tokenizer):
        tiny = TinyModelConfig(
            hidden_size=student.hidden_size,
            num_layers=student.num_layers,
            num_heads=student.num_heads,
            intermediate_size=student.intermediate_size,
            max_position_embeddings=teacher_config.max_position_embeddings,
        )
        model, _ = build_tiny(tiny, seed, tokenizer=tokenizer)
        return model

    # Any other decoder (Qwen2, Mistral, ...): the teacher's own config class, shrunk. The vocabulary
    # stays the teacher's (a padded one included) so top-k token ids index the student's logits.
    fields = teacher_config.to_dict()
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [key for key in needed if key not in fields]
    if missing:
        raise ValueError(
            f"distill: teacher architecture {teacher_config.model_type!r} has no {missing[0]!r} in its config; "
            "only Llama-like decoder configs can be shrunk into a student"
        )
    fields.update(
        hidden_size=student.hidden_size,
        num_hidden_layers=student.num_layers,
        num_attention_heads=student.num_heads,
        num_key_value_heads=student.num_heads,
        intermediate_size=student.intermediate_size,
        tie_word_embeddings=True,
        vocab_size=vocab,
    )
    if "head_dim" in fields:  # some configs (Qwen3, Gemma) store it explicitly
        fields["head_dim"] = student.hidden_size // student.num_heads
    if "layer_types" in fields:  # per-layer attention kinds, sized to the teacher's depth
        fields["layer_types"] = None
    if "max_window_layers" in fields:
        fields["max_window_layers"] = student.num_layers
    for key in ("quantization_config", "architectures", "dtype", "torch_dtype"):
        fields.pop(key, None)
    config = type(teacher_config).from_dict(fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ----------------------------------------------------------------------------- teacher pre-compute


@torch.no_grad()
def precompute_teacher_topk(teacher, examples: list[dict], top_k: int, batch_size: int, pad_id: int, device):
    """Top-k teacher logits at every completion position of every example, computed once.

    Returns (values, ids, kept_mass): per example a [positions, k] float16 tensor of logits and a
    [positions, k] tensor of token ids (int16 when the vocabulary fits, else int32), plus the mean
    probability (T=1) the top-k ids hold, i.e. how much of the teacher's distribution survives.
    """
    teacher.eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    id_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
    k = min(top_k, vocab)
    values, ids = [], []
    mass_sum, positions = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = formatting.pad_batch(chunk, pad_id)
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1].float()
        mask = completion_mask(batch["labels"]).to(device)
        selected = logits[mask]  # [positions in this batch, vocab], row-major over the chunk
        top_values, top_ids = selected.topk(k, dim=-1)
        mass_sum += selected.softmax(-1).gather(1, top_ids).sum().item()
        positions += selected.shape[0]
        counts = mask.sum(dim=1).tolist()
        for row_values, row_ids in zip(top_values.split(counts), top_ids.split(counts)):
            values.append(row_values.to("cpu", torch.float16))
            ids.append(row_ids.to("cpu", id_dtype))
    return values, ids, mass_sum / max(positions, 1)


def kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_ids: torch.Tensor, temperature: float):
    """KL(teacher top-k softmax || student log-softmax over the same ids), both at `temperature`,
    mean over positions. student_logits: [N, vocab]; teacher_values/ids: [N, k]."""
    teacher_log_probs = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.gather(1, teacher_ids.long()) / temperature, dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean()


# ----------------------------------------------------------------------------- evaluation



def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean()) if a.numel() else math.nan


# ----------------------------------------------------------------------------- training


def row_schedule(rows: int, total: int, seed: int) -> list[int]:
    """The order in which the student sees rows: a fresh permutation per epoch, `total` rows in all."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < total:
        epoch = list(range(rows))
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:total]


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def run(config: DistillConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    seed = config.seed if config.seed is not None else 0
    teacher_dir, data_dir = _input_dir(inputs, "teacher"), _input_dir(inputs, "data")
    device = pick_device()

    tokenizer = load_tokenizer(teacher_dir)
    pad_id = tokenizer.pad_token_id
    train_path, eval_path = data_dir / "instruction" / "train.jsonl", data_dir / "instruction" / "eval.jsonl"
    train_rows, eval_rows = read_instruction_rows(train_path), read_instruction_rows(eval_path)[: config.eval_rows]
    train_rows_available = len(train_rows)
    # Encoded once with the chat template, only as many rows as the steps will see (the file is in a
    # seeded hash order, so its first rows are a random sample); rows with no completion token
    # within max_length are dropped below, and the tokenized contract bounds them (and truncation)
    # before the first step.
    chat = ChatFormat(tokenizer)
    train_rows, encoded_train = encode_until_trainable(chat, train_rows, config.max_length, config.max_steps * config.batch_size)
    records = {"train": train_rows, "eval": eval_rows}
    encoded = {"train": encoded_train, "eval": chat.encode_rows(eval_rows, config.max_length)}
    contract = check_instruction_rows("distill", records, encoded, out_dir, overlong="truncated")
    train_examples, eval_examples = trainable(encoded["train"]), trainable(encoded["eval"])
    for path, examples in ((train_path, train_examples), (eval_path, eval_examples)):
        if not examples:
            raise ValueError(f"{path}: no row keeps a completion token within max_length {config.max_length}")

    teacher = load_causal_lm(teacher_dir).to(device)
    student = build_student(teacher, tokenizer, config.student, seed).to(device)
    teacher_eval_loss, teacher_predictions = completion_scores(teacher, eval_examples, pad_id)
    initial_eval_loss, initial_predictions = completion_scores(student, eval_examples, pad_id)

    # The rows the student will see, and the teacher's top-k logits for each of them, computed once.
    schedule = row_schedule(len(train_examples), config.max_steps * config.batch_size, seed)
    seen = sorted(set(schedule))
    use_teacher = config.alpha < 1.0
    precompute_started = time.perf_counter()
    teacher_values: dict[int, torch.Tensor] = {}
    teacher_ids: dict[int, torch.Tensor] = {}
    if use_teacher:
        values, ids, kept_mass = precompute_teacher_topk(
            teacher, [train_examples[i] for i in seen], config.top_k, config.batch_size, pad_id, device
        )
        teacher_values, teacher_ids = dict(zip(seen, values)), dict(zip(seen, ids))
    precompute_seconds = time.perf_counter() - precompute_started
    teacher_params, teacher_bytes = count_parameters(teacher), folder_size_bytes(teacher_dir)
    del teacher  # the training loop never needs it: this is the point of pre-computing
    if device.type == "cuda":
        torch.cuda.empty_cache()

    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.max_steps))
    meter = Throughput("distill", config.max_steps)
    history: list[tuple[int, float]] = []
    tokens = 0
    ce_value = kd_value = 0.0
    # The data position is the step: the schedule is fixed by the seed, so a resumed run sees the
    # rows an uninterrupted one would.
    checkpoints = LoopCheckpoints(config.checkpoint_every, config.max_steps)
    first_step, saved = checkpoints.resume({"student": student}, {"optimizer": optimizer, "scheduler": scheduler})
    if saved is not None:
        history = [(int(step), float(loss)) for step, loss in saved["history"]]
        tokens, ce_value, kd_value = int(saved["tokens"]), float(saved["ce"]), float(saved["kd"])
    student.train()
    for step in range(first_step, config.max_steps):
        rows = schedule[step * config.batch_size : (step + 1) * config.batch_size]
        batch = {k: v.to(device) for k, v in formatting.pad_batch([train_examples[i] for i in rows], pad_id).items()}
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = completion_mask(batch["labels"])
        # Boolean indexing walks row-major, the same order as concatenating each row's teacher positions.
        selected = logits[mask].float()
        ce = F.cross_entropy(selected, batch["labels"][:, 1:][mask])
        loss = config.alpha * ce
        if use_teacher:
            values = torch.cat([teacher_values[i] for i in rows]).to(device)
            ids = torch.cat([teacher_ids[i] for i in rows]).to(device)
            kd = kd_loss(selected, values, ids, config.temperature)
            loss = loss + (1.0 - config.alpha) * config.temperature**2 * kd
            kd_value = kd.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        failpoints.reach("train-step")  # gradients computed, weights not yet updated: mid step
        optimizer.step()
        scheduler.step()

        ce_value = ce.item()
        tokens += int(batch["attention_mask"].sum())
        history.append((step + 1, loss.item()))
        meter.update(step + 1, tokens, history[-1][1])
        loop_state = {"history": history, "tokens": tokens, "ce": ce_value, "kd": kd_value}
        checkpoints.maybe_save(step + 1, {"student": student}, {"optimizer": optimizer, "scheduler": scheduler}, loop_state)
    training = meter.summary()

    student_eval_loss, student_predictions = completion_scores(student, eval_examples, pad_id)
    save_pretrained(student.cpu(), tokenizer, out_dir)
    write_loss_history(out_dir, history)

    student_params = count_parameters(student)
    metrics = {
        **training,
        "student_parameters": student_params,
        "teacher_parameters": teacher_params,
        "size_ratio": round(student_params / teacher_params, 4),
        "student_bytes": folder_size_bytes(out_dir),
        "teacher_bytes": teacher_bytes,
        "teacher_eval_loss": round(teacher_eval_loss, 5),
        "student_eval_loss_before": round(initial_eval_loss, 5),
        "student_eval_loss": round(student_eval_loss, 5),
        "agreement_before": round(_agreement(initial_predictions, teacher_predictions), 4),
        "agreement": round(_agreement(student_predictions, teacher_predictions), 4),
        "eval_positions": int(teacher_predictions.numel()),
        "teacher_precompute_seconds": round(precompute_seconds, 2),
        "resumed_from_step": first_step,
        "train_rows": len(train_examples),  # the trainable rows encoded: as many as the steps use
        "train_rows_available": train_rows_available,
        "final_ce_loss": round(ce_value, 5),
        "contract_expectations_passed": contract["passed"],
    }
    if use_teacher:
        metrics.update(
            teacher_rows=len(teacher_values), teacher_topk_mass=round(kept_mass, 4), final_kd_loss=round(kd_value, 5)
        )
    return Artifact.draft(out_dir, metrics)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, DistillConfig)
