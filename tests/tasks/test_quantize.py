"""The quantize stage: NF4 and int8 folders that reload on the CPU, are smaller, and still generate."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import formatting
from posttrain.artifacts import Artifact
from posttrain.config import QuantizeConfig, TinyModelConfig
from posttrain.models import build_tiny, folder_size_bytes, load_causal_lm, load_tokenizer, save_pretrained
from tasks import quantize


@pytest.fixture(scope="module")
def quantized(tiny_base, tiny_data, tmp_path_factory) -> Artifact:
    out = tmp_path_factory.mktemp("quantize")
    return quantize.run(QuantizeConfig(eval_rows=40), {"source": tiny_base, "data": tiny_data}, out)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_each_method_reloads_smaller_and_generates(quantized, tiny_base, method):
    import bitsandbytes as bnb

    folder = quantized.path / method
    model = AutoModelForCausalLM.from_pretrained(folder)  # the plain call later stages make, on the CPU
    tokenizer = load_tokenizer(folder)
    layer = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[method]
    assert any(isinstance(module, layer) for module in model.modules())
    assert model.config.quantization_config.quant_method == "bitsandbytes"
    # Embeddings and the tied output head stay in full precision.
    assert model.get_input_embeddings().weight.dtype == torch.float32

    m = quantized.metrics
    assert m[f"{method}_bytes"] == folder_size_bytes(folder) < folder_size_bytes(tiny_base.path)
    assert m[f"{method}_size_ratio"] < 0.8
    assert math.isfinite(m[f"{method}_eval_loss"]) and math.isfinite(m[f"{method}_loss_delta"])
    assert m[f"{method}_eval_loss"] - m["source_eval_loss"] == pytest.approx(m[f"{method}_loss_delta"], abs=1e-4)
    assert 0.9 <= m[f"{method}_agreement"] <= 1.0  # a random tiny model's argmax barely moves
    assert m[f"{method}_load_seconds"] > 0 and 0 < m[f"{method}_quantized_fraction"] <= 1

    encoded = tokenizer(formatting.ChatFormat(tokenizer).prompt([{"role": "user", "content": "copy abc"}]), return_tensors="pt", add_special_tokens=False)
    with quantize.quiet_bitsandbytes():
        generated = model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, encoded["input_ids"].shape[1] + 4)
    # The project's own loader (safetensors only, as the evaluate stage uses) keeps it quantized too.
    assert any(isinstance(module, layer) for module in load_causal_lm(folder).modules())


def test_manifest_lists_variants_and_metrics_are_numbers(quantized):
    assert quantized.manifest["variants"] == ["nf4", "int8"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in quantized.metrics.values())
    assert quantized.metrics["eval_rows"] == 40
    # The default tiny model (MLP width 192) fits bnb's packed CPU 4-bit kernel: every linear is quantized.
    assert quantized.manifest["nf4_skipped_modules"] == []
    assert quantized.metrics["nf4_quantized_fraction"] == 1.0
    assert quantized.metrics["nf4_size_ratio"] < 0.3  # ~4 bits per weight plus fp32 embeddings


def test_nf4_skips_linears_whose_shapes_do_not_fit(tiny_data, tmp_path):
    # MLP width 176 is not a multiple of 64: bnb's CPU 4-bit kernel would fail at generate(), so
    # those layers stay in fp32 and are listed in the manifest.
    model, tokenizer = build_tiny(TinyModelConfig(intermediate_size=176), seed=0)
    save_pretrained(model, tokenizer, tmp_path / "src")
    (tmp_path / "out").mkdir()
    artifact = quantize.run(
        QuantizeConfig(methods=["nf4"], eval_rows=20), {"source": Artifact(tmp_path / "src"), "data": tiny_data}, tmp_path / "out"
    )
    expected = [f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj", "down_proj")]
    assert artifact.manifest["variants"] == ["nf4"] and artifact.manifest["nf4_skipped_modules"] == expected
    assert 0.2 < artifact.metrics["nf4_quantized_fraction"] < 0.5  # the attention projections only
    assert abs(artifact.metrics["nf4_loss_delta"]) < 0.05
    assert not (tmp_path / "out" / "int8").exists()


def test_int8_matmul_messages_are_silenced_only_inside_the_block(quantized, caplog):
    model = AutoModelForCausalLM.from_pretrained(quantized.path / "int8")
    inputs = torch.tensor([[5, 6, 7]])
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        with quantize.quiet_bitsandbytes(), torch.no_grad():
            model(input_ids=inputs)
        assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
        with torch.no_grad():
            model(input_ids=inputs)
        assert [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


def test_missing_eval_split_is_a_one_line_error(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"instruction/eval.jsonl: file not found"):
        quantize.run(QuantizeConfig(), {"source": tiny_base, "data": Artifact(tmp_path)}, tmp_path)
