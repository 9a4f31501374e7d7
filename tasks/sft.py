"""SFT stage: supervised fine-tuning of the base model on instruction data with TRL's SFTTrainer.

    run(SftConfig(max_steps=2500), {"base": base, "data": data}, out_dir)
    python -m tasks.sft --config sft.json --inputs inputs.json --out DIR     # own process / accelerate

Full fine-tuning by default; `method: lora` trains a peft LoRA adapter (on every linear layer by
default, `lora.target_modules: all-linear`) and merges it into the weights before saving, so every
later stage receives a plain model folder whatever the method; the adapter itself is kept beside
it in `adapter/` (peft's format), for serving it on the base or stacking it elsewhere.
`method: qlora` trains the same adapter on a 4-bit NF4 copy of the base (bitsandbytes, double
quantization, bf16 compute where the GPU has it) and merges it into the full-precision base, as the
QLoRA recipe does: the 4-bit copy only saves memory while training. It needs a CUDA GPU (the
bitsandbytes CPU build has no 4-bit backward; bench/gpu_check.sh ran it on an H200).
`batching`: padded (each batch padded to its longest row), padding_free (a batch's rows laid end
to end, positions restarting per row, no attention across rows), or packed (rows packed into
max_length bins by best fit, each bin a row with restarting positions); the loss on the same
tokens is the same either way
(tests/tasks/test_sft.py), and the useful tokens/s differ (bench/sft.py).
Rows are rendered with the base model's chat template (posttrain.formatting.ChatFormat); a
multi-turn chat keeps its turns and system prompt, and the loss is on the assistant replies with
their end-of-turn tokens — every reply by default, the last only with `train_on: last`. The
encodings go to SFTTrainer as `input_ids` + `labels`, so TRL trains on exactly what was checked.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from data_contracts import check_instruction_rows
from posttrain.artifacts import Artifact
from posttrain.config import SftConfig
from posttrain.formatting import IGNORE_INDEX, ChatFormat, pad_batch, record_messages
from posttrain.jsonl import read_instruction_rows
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer, pick_device, quiet_bitsandbytes, save_pretrained
from posttrain.row_attention import rows_attention
from posttrain.scoring import completion_scores
from posttrain.training import (
    ProgressCallback,
    checkpointing,
    logged_losses,
    quiet,
    remove_scratch,
    resumed_step,
    trainer_defaults,
    use_bf16,
    write_loss_history,
)

DATA_FILES = ("data_contracts/sft_tokenized.json",)  # the tokenized contract this stage runs before training


def _lora_config(config: SftConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_trainable_model(config: SftConfig, base_dir: Path):
    """The base as the method trains it: float32, or 4-bit NF4 on the GPU for qlora."""
    if config.method != "qlora":
        return load_causal_lm(base_dir, dtype="float32")
    import bitsandbytes  # noqa: F401  transformers loads it; imported here so its version is in this stage's key
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ValueError("sft.method qlora needs a CUDA GPU (bitsandbytes has no 4-bit backward on the CPU); use sft.method lora here")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16() else torch.float16,
    )
    with quiet_bitsandbytes():
        return load_causal_lm(base_dir, dtype="float32", quantization_config=quantization, device_map={"": pick_device()})


def merge_into_full_precision(peft_model, base_dir: Path, config: SftConfig):
    """The trained adapter merged into a float32 copy of the base (the 4-bit weights only served training)."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {name: value.detach().to("cpu", torch.float32) for name, value in get_peft_model_state_dict(peft_model).items()}
    full = get_peft_model(load_causal_lm(base_dir, dtype="float32"), _lora_config(config))
    loaded = set_peft_model_state_dict(full, adapter)
    if loaded.unexpected_keys:
        raise RuntimeError(f"sft qlora: adapter weights that the full-precision model lacks: {loaded.unexpected_keys[:3]}")
    return full.merge_and_unload()


class PackedRowsCollator:
    """A batch of packed bins, each bin its own row: right-padded to the longest bin, position ids
    restarting at every row it holds (and again in the padding), no attention mask — transformers
    builds a block-diagonal causal mask from the positions, or on the CPU each row attends on its
    own (posttrain.row_attention), so nothing attends across rows. TRL's
    own padding-free collator lays the whole batch end to end instead, which on an attention
    without variable-length kernels (SDPA on the CPU) costs the square of the whole batch's length."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, bins: list[dict]) -> dict:
        import torch

        batch = pad_batch(bins, self.pad_id)
        del batch["attention_mask"]  # the positions say where each row starts; a mask would hide that
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.zeros_like(batch["input_ids"])
        for row, packed in enumerate(bins):
            padding = width - len(packed["input_ids"])
            batch["position_ids"][row] = torch.cat([torch.arange(n) for n in [*packed["seq_lengths"], padding] if n])
            starts = torch.tensor([0, *packed["seq_lengths"]]).cumsum(0)[:-1]
            batch["labels"][row, starts] = IGNORE_INDEX  # a row's first token is never predicted from the row before it
        return batch


class PlainLossSFTTrainer(SFTTrainer):
    """SFTTrainer with transformers' plain causal-LM loss. TRL's own computes the loss through a fused
    head that also yields per-token entropy and top-1 accuracy every step, for its logs; posttrain
    reads neither, and on the CPU that path cost a third of the step (bench/sft.py)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from transformers import Trainer

        inputs["use_cache"] = False  # as TRL does; a cache would also hide packed rows from the mask
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def rows_needed(config: SftConfig) -> int | None:
    """How many training rows `max_steps` steps consume (steps x global batch, the same on any number
    of devices: training_schedule); None when every row may be used: `epochs` derives the steps from
    the data, and packed bins hold an unknown number of rows."""
    if config.epochs is not None or config.batching == "packed":
        return None
    return config.max_steps * (config.global_batch or config.batch_size * config.grad_accum)


def training_schedule(config: SftConfig, train_rows: int, devices: int) -> tuple[int, int, int]:
    """(optimizer steps, gradient accumulation, micro-batch per device) from the config and the data.

    The global batch — rows per optimizer step — is `global_batch`, else `batch_size x grad_accum`,
    and it is the same on any number of devices: N processes split it (the micro-batch shrinks to
    fit, then the accumulation). So a DDP run trains on the same batches as a one-device run, only
    its float sums in another order, which is why the launcher is not in the cache key. Steps come
    from `epochs` over the rows when it is given."""
    global_rows = config.global_batch or config.batch_size * config.grad_accum
    micro = min(config.batch_size, max(1, global_rows // devices))
    if global_rows % (micro * devices):
        named = f"sft.global_batch {global_rows}" if config.global_batch else f"the global batch {global_rows} (sft.batch_size x sft.grad_accum)"
        raise ValueError(f"{named} is not a multiple of sft.batch_size x devices = {micro * devices}")
    if micro * devices > train_rows:
        # The loader would quietly give every step the same smaller batch than the one configured.
        unit = "packed sequences" if config.batching == "packed" else "train rows"
        raise ValueError(f"sft.batch_size {micro} x {devices} device(s) is more than the data's {train_rows} {unit}; lower sft.batch_size")
    accumulation = global_rows // (micro * devices)
    if config.epochs is None:
        return config.max_steps, accumulation, micro
    return max(1, math.ceil(config.epochs * train_rows / global_rows)), accumulation, micro


def save_adapter(peft_model, folder: Path, base: Artifact) -> None:
    """The LoRA adapter alone (adapter_config.json + adapter_model.safetensors). peft records the
    base's folder as an absolute path; the store holds none, so it names the base artifact by its
    path relative to the store root instead (the manifest's inputs say the same)."""
    import json

    peft_model.save_pretrained(folder, safe_serialization=True)
    config_file = folder / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = base.manifest.get("path", Path(base.path).name)
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def completion_loss(model, tokenizer, encoded: list[dict]) -> float:
    """Mean cross-entropy per trained (assistant) token on held-out rows: the stage's own quality figure."""
    return completion_scores(model, encoded, tokenizer.pad_token_id)[0]


def run(config: SftConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    seed = config.seed if config.seed is not None else 0
    base_dir, data_dir = inputs["base"].path, inputs["data"].path
    tokenizer = load_tokenizer(base_dir)
    chat = ChatFormat(tokenizer)
    model = load_trainable_model(config, base_dir)
    records = {
        "train": read_instruction_rows(data_dir / "instruction" / "train.jsonl"),
        "eval": read_instruction_rows(data_dir / "instruction" / "eval.jsonl")[: config.eval_rows],
    }
    if not records["train"]:
        raise ValueError(f"{data_dir / 'instruction' / 'train.jsonl'}: no instruction rows to train on")
    train_rows_available = len(records["train"])
    # Tokenize, check and hand over only the rows the steps will use: 2 steps on Alpaca's 48k rows
    # should not pay for encoding all of them. The file is already in a seeded hash order, so its
    # first rows are a random sample, and the trainer's shuffle orders them.
    needed = rows_needed(config)
    if needed is not None and needed < len(records["train"]):
        records["train"] = records["train"][:needed]
    # Encoded once with the model's chat template (loss on the assistant replies), checked by the
    # tokenized contract before the first step, and handed to the trainer as they are.
    encoded = {split: chat.encode_rows(rows, config.max_length, train_on=config.train_on) for split, rows in records.items()}
    contract = check_instruction_rows("sft", records, encoded, out_dir, overlong="truncated")
    train_dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded["train"]])
    if config.batching == "packed":
        # Best-fit-decreasing bins of max_length tokens; rows keep their boundaries (`seq_lengths`),
        # so positions restart and attention stays inside each row. Packed here, not by the trainer,
        # so the steps of `epochs` count bins.
        from trl import pack_dataset

        train_dataset = pack_dataset(train_dataset, config.max_length, strategy="bfd")

    eval_loss_before = completion_loss(model, tokenizer, encoded["eval"]) if encoded["eval"] else math.nan
    devices = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate launch / torchrun set it
    steps, accumulation, micro_batch = training_schedule(config, len(train_dataset), devices)
    # A few log points even for short runs (the loss curve and the MLflow series need them).
    checkpoints, resume_from = checkpointing(config.checkpoint_every, max(1, min(10, steps // 10)), steps)
    args = SFTConfig(
        **{**trainer_defaults(out_dir, seed), "logging_steps": max(1, min(10, steps // 10)), **checkpoints},
        max_steps=steps,
        # On several processes the loader yields each whole global micro-batch and every process takes
        # its slice (accelerate's split_batches): the rows of a step, and their order, are those of a
        # one-process run, not a DistributedSampler's own shuffle.
        per_device_train_batch_size=micro_batch * devices,
        accelerator_config={"split_batches": devices > 1},
        gradient_accumulation_steps=accumulation,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        # The rows are already cut at max_length (ChatFormat); TRL refuses a max_length it would not enforce.
        max_length=config.max_length if config.batching == "padded" else None,
        packing=False,  # packed above when asked
        # Padding-free: a batch becomes one row with position ids restarting per sequence; no
        # sequence attends to another (a block-diagonal mask, or row by row on the CPU, below).
        # Packed bins go through PackedRowsCollator, one bin per row.
        padding_free=config.batching == "padding_free",
    )
    progress = ProgressCallback("sft")
    trainer = PlainLossSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(config) if config.method in ("lora", "qlora") else None,
        data_collator=PackedRowsCollator(tokenizer.pad_token_id) if config.batching == "packed" else None,
        callbacks=[progress],
    )
    quiet(trainer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # On the CPU, packed and padding-free rows attend within themselves, row by row
    # (posttrain.row_attention): SDPA there has no variable-length kernel, and the block-diagonal
    # mask over a whole bin cost twice the attention (bench/sft.py). On a GPU transformers' own
    # path stays: flash-attention's varlen kernel when the model is loaded with it, else SDPA's
    # masked kernel, whose cost against row-by-row calls is for bench/gpu_sft.py to measure.
    row_by_row = config.batching != "padded" and trainer.args.device.type == "cpu"
    with rows_attention(model) if row_by_row else nullcontext():
        trainer.train(resume_from_checkpoint=resume_from)

    trained = trainer.model
    if config.method in ("lora", "qlora"):
        save_adapter(trained, out_dir / "adapter", inputs["base"])
    if config.method == "lora":
        trained = trained.merge_and_unload()  # downstream stages get a plain model folder
    elif config.method == "qlora":
        trained = merge_into_full_precision(trained, base_dir, config)
    eval_loss_after = completion_loss(trained, tokenizer, encoded["eval"]) if encoded["eval"] else math.nan
    save_pretrained(trained, tokenizer, out_dir)
    write_loss_history(out_dir, logged_losses(trainer))
    remove_scratch(out_dir)

    metrics = {
        **progress.summary(),
        "parameters": count_parameters(trained),
        "trainable_parameters": trainable,
        "train_rows": train_rows_available,
        "train_rows_used": len(records["train"]),
        "train_sequences": len(train_dataset),  # bins when packed
        "optimizer_steps": trainer.state.global_step,
        "resumed_from_step": resumed_step(resume_from),
        "gradient_accumulation": accumulation,
        "global_batch": micro_batch * devices * accumulation,
        "devices": devices,
        "train_tokens_trained_on": sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in encoded["train"]),
        "eval_loss_before": round(eval_loss_before, 5),
        "eval_loss": round(eval_loss_after, 5),
        "contract_expectations_passed": contract["passed"],
    }
    return Artifact.draft(
        out_dir, metrics, method=config.method, chat_template=chat.describe(record_messages(records["train"][0])), history=progress.history
    )


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, SftConfig)
