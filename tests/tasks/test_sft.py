"""SFT trains: held-out completion loss falls; LoRA trains only adapters and saves a merged model;
QLoRA refuses the CPU and merges its adapter into the full-precision base."""

import pytest
import torch
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
