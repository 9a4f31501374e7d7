"""SFT trains: held-out completion loss falls; LoRA trains only adapters and saves a merged model;
QLoRA refuses the CPU and merges its adapter into the full-precision base."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tasks.sft
from posttrain.config import LoraConfig, SftConfig
from posttrain.formatting import IGNORE_INDEX, ChatFormat
from posttrain.jsonl import read_instruction_rows
from posttrain.models import load_tokenizer


def test_full_sft_lowers_heldout_loss_and_saves_hf_folder(tiny_base, tiny_data, tmp_path):
    artifact = tasks.sft.run(SftConfig(max_steps=40, batch_size=16, seed=0, eval_rows=64), {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    assert metrics["train_steps"] == 40
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 1.0  # from ~4.6 (uniform over 100 chars)
    assert metrics["tokens_per_second"] > 0
    assert metrics["trainable_parameters"] == metrics["parameters"]
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "_trainer").exists()
    # Per logging step (every 4 of 40): learning rate, gradient norm, tokens/s and peak memory in the
    # manifest (clock figures never go in the artifact's files), and a loss curve.
    history = artifact.manifest["history"]
    assert [entry["step"] for entry in history] == list(range(4, 41, 4))
    assert all({"learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb"} <= set(entry) for entry in history)
    assert history[-1]["learning_rate"] < history[0]["learning_rate"]  # cosine decay
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)


def test_a_short_run_encodes_only_the_rows_its_steps_use(tiny_base, tiny_data, tmp_path):
    # 2 steps of 4 rows read 8 rows of the 540: encoding, the tokenized contract and the trainer's
    # dataset cover those 8, so a short run on a big corpus costs what its steps cost.
    artifact = tasks.sft.run(SftConfig(max_steps=2, batch_size=4, seed=0, eval_rows=8), {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    assert metrics["train_rows"] == 540 and metrics["train_rows_used"] == metrics["train_sequences"] == 8
    chat = ChatFormat(load_tokenizer(tiny_base.path))
    first_rows = read_instruction_rows(tiny_data.path / "instruction" / "train.jsonl")[:8]
    trained = sum(label != IGNORE_INDEX for encoded in chat.encode_rows(first_rows, SftConfig().max_length) for label in encoded["labels"])
    assert metrics["train_tokens_trained_on"] == trained
    assert metrics["optimizer_steps"] == 2


def test_lora_trains_adapters_only_and_merges(tiny_base, tiny_data, tmp_path):
    config = SftConfig(method="lora", lora=LoraConfig(r=4, alpha=8), max_steps=20, batch_size=16, lr=5e-3, seed=0, eval_rows=64)
    artifact = tasks.sft.run(config, {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 2
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert not (tmp_path / "adapter_config.json").exists()  # merged: a plain model folder
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # The adapter is kept beside it, on every linear layer, and base + adapter = the merged model.
    import json

    from peft import PeftModel

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} == linear  # all-linear, resolved
    assert not Path(adapter_config["base_model_name_or_path"]).is_absolute()
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path, use_safetensors=True)
    stacked = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(stacked(ids).logits, merged(ids).logits, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine qlora trains instead (bench/gpu_check.sh)")
def test_qlora_on_the_cpu_fails_before_training_with_one_line(tiny_base, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"^sft.method qlora needs a CUDA GPU .*use sft.method lora here$"):
        tasks.sft.run(SftConfig(method="qlora", max_steps=5, seed=0), {"base": tiny_base, "data": tiny_data}, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_qlora_merge_puts_the_adapter_into_a_full_precision_base(tiny_base):
    """What qlora does after training, checked with an adapter on a float32 model: the merged
    model computes what the base plus adapter computed."""
    from peft import get_peft_model

    config = SftConfig(method="qlora", lora=LoraConfig(r=4, alpha=8))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base.path, use_safetensors=True), tasks.sft._lora_config(config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: lora_B starts at zero
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged = tasks.sft.merge_into_full_precision(peft_model, tiny_base.path, config)
        base = AutoModelForCausalLM.from_pretrained(tiny_base.path, use_safetensors=True)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-2)  # the adapter did change the model


def test_steps_follow_from_epochs_and_accumulation_from_the_global_batch(tiny_base, tiny_data, tmp_path):
    from tasks.sft import training_schedule

    # 540 rows, 2 epochs, a global batch of 32 from micro-batches of 8 on one device: 4 accumulated
    # micro-batches per step, ceil(2 * 540 / 32) = 34 steps; on two devices, 2 micro-batches each.
    config = SftConfig(epochs=2, batch_size=8, global_batch=32)
    assert training_schedule(config, 540, devices=1) == (34, 4, 8)
    assert training_schedule(config, 540, devices=2) == (34, 2, 8)
    assert training_schedule(SftConfig(max_steps=7, grad_accum=3), 540, devices=1) == (7, 3, 64)
    # Without global_batch the global batch is batch_size x grad_accum on any number of devices:
    # 64 rows a step is 2 x 32 on two devices, not 128.
    assert training_schedule(SftConfig(max_steps=7, batch_size=64), 540, devices=2) == (7, 1, 32)
    with pytest.raises(ValueError, match="not a multiple of sft.batch_size x devices = 24"):
        training_schedule(SftConfig(epochs=1, batch_size=8, global_batch=32), 540, devices=3)
    assert training_schedule(SftConfig(epochs=1, max_steps=5, batch_size=8, global_batch=8, grad_accum=4), 540, 1) == (68, 1, 8)  # epochs and global_batch win
    with pytest.raises(ValueError, match=r"^sft.batch_size 8 x 2 device\(s\) is more than the data's 12 train rows; lower sft.batch_size$"):
        training_schedule(SftConfig(batch_size=16), 12, devices=2)

    artifact = tasks.sft.run(SftConfig(epochs=0.5, batch_size=8, global_batch=16, seed=0, eval_rows=16), {"base": tiny_base, "data": tiny_data}, tmp_path)
    rows = artifact.metrics["train_rows"]
    assert artifact.metrics["train_steps"] == -(-rows // 32) and artifact.metrics["gradient_accumulation"] == 2
    assert artifact.metrics["global_batch"] == 16


def test_the_loss_on_the_same_tokens_is_the_same_padded_padding_free_or_packed(tiny_base, tiny_data):
    """The same encoded rows padded, padding-free (TRL's collator) and packed into bins
    (PackedRowsCollator); transformers turns the restarting position ids into a block-diagonal
    mask, and the stage's own attention for these batches (posttrain.row_attention) attends row by
    row, so no row attends to another either way."""
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from posttrain.formatting import ChatFormat
    from posttrain.jsonl import read_instruction_rows
    from posttrain.models import load_tokenizer
    from posttrain.row_attention import rows_attention

    tokenizer = load_tokenizer(tiny_base.path)
    rows = read_instruction_rows(tiny_data.path / "instruction" / "train.jsonl")[:24]
    encoded = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in ChatFormat(tokenizer).encode_rows(rows, 96)]
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, use_safetensors=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a model that is not uniform, so attention across rows would show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)

    def loss(batch) -> float:
        # use_cache=False, as SFTTrainer passes: with a cache, transformers does not look for packed rows.
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}, use_cache=False).loss.item()

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(encoded)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(encoded)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    from datasets import Dataset

    bins = list(pack_dataset(Dataset.from_list(encoded), 96, strategy="bfd"))
    packed = tasks.sft.PackedRowsCollator(tokenizer.pad_token_id)(bins)
    assert len(bins) < len(encoded) and packed["input_ids"].shape[0] == len(bins)
    assert loss(flat) == pytest.approx(loss(padded), abs=1e-4)
    assert loss(packed) == pytest.approx(loss(padded), abs=1e-4)
    reference = loss(padded)
    with rows_attention(model):  # as tasks.sft trains packed and padding-free batches
        assert loss(flat) == pytest.approx(reference, abs=1e-4)
        assert loss(packed) == pytest.approx(reference, abs=1e-4)
    # Without the restarting positions the rows would see each other: a different loss.
    crossing = {"input_ids": flat["input_ids"], "labels": flat["labels"]}
    assert abs(loss(crossing) - loss(padded)) > 1e-3


@pytest.mark.parametrize("batching, method", [("padding_free", "full"), ("packed", "full"), ("packed", "lora")])
def test_padding_free_and_packed_sft_train(tiny_base, tiny_data, tmp_path, batching, method):
    artifact = tasks.sft.run(SftConfig(method=method, max_steps=30, batch_size=8, seed=0, eval_rows=64, batching=batching), {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    # The adapter learns less in 30 steps: padded LoRA goes 4.58 -> 4.23 on these rows, packed 4.23 too.
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - {"full": 0.5, "lora": 0.25}[method]
    if batching == "packed":
        assert metrics["train_sequences"] < metrics["train_rows"] / 3  # short rows: several per 96-token bin
