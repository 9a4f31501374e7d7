"""SFT trains: held-out completion loss falls; LoRA trains only adapters and saves a merged model."""

from transformers import AutoModelForCausalLM

import tasks.sft
from posttrain.config import LoraConfig, SftConfig


def test_full_sft_lowers_heldout_loss_and_saves_hf_folder(tiny_base, tiny_data, tmp_path):
    artifact = tasks.sft.run(SftConfig(max_steps=40, batch_size=16, seed=0, eval_rows=64), {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    assert metrics["train_steps"] == 40
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 1.0  # from ~4.6 (uniform over 100 chars)
    assert metrics["tokens_per_second"] > 0
    assert metrics["trainable_parameters"] == metrics["parameters"]
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "_trainer").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)


def test_lora_trains_adapters_only_and_merges(tiny_base, tiny_data, tmp_path):
    config = SftConfig(method="lora", lora=LoraConfig(r=4, alpha=8), max_steps=20, batch_size=16, lr=5e-3, seed=0, eval_rows=64)
    artifact = tasks.sft.run(config, {"base": tiny_base, "data": tiny_data}, tmp_path)
    metrics = artifact.metrics
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 2
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert not (tmp_path / "adapter_config.json").exists()  # merged: a plain model folder
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
