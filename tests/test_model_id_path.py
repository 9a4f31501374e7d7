"""The `model.name_or_path` code path (what configs/qwen2.5-0.5b.yaml uses), on a locally built
Qwen2-shaped folder with a locally trained byte-level BPE tokenizer carrying Qwen2.5's ChatML
template verbatim — no hub access here."""

import hashlib
import shutil

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

import tasks.base
import tasks.evaluate
import tasks.sft
from posttrain.artifacts import Artifact
from posttrain.config import EvaluateConfig, load_config
from posttrain.jsonl import read_jsonl, write_jsonl
from posttrain.models import ModelLoadError, load_causal_lm
from tests.posttrain.test_formatting import QWEN25_TEMPLATE, THREE_TURNS, chatml_tokenizer

QWEN_CONFIG = "configs/qwen2.5-0.5b.yaml"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A Qwen2-shaped model with a byte-level BPE tokenizer trained here that carries Qwen2.5's
    ChatML template verbatim (no pad token, like Qwen base)."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = chatml_tokenizer()
    tokenizer.pad_token = None
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_data):
    """The tiny instruction data plus multi-turn chats (system prompt, three exchanges)."""
    folder = tmp_path_factory.mktemp("chat-data")
    shutil.copytree(tiny_data.path, folder, dirs_exist_ok=True)
    rows = read_jsonl(folder / "instruction" / "train.jsonl")
    chat = {"prompt": "history", "response": THREE_TURNS[-1]["content"], "messages": THREE_TURNS}
    write_jsonl(folder / "instruction" / "train.jsonl", [chat] * 20 + rows)
    return Artifact(folder, {"digest": "chat-data", "metrics": {}})


def test_qwen_config_runs_base_sft_lora_and_evaluate_with_the_chatml_template(qwen_folder, chat_data, tiny_benchmarks, tmp_path):
    cfg = load_config(QWEN_CONFIG, [f"model.name_or_path={qwen_folder}", "model.dtype=float32", "sft.max_steps=6", "sft.batch_size=8"])
    (tmp_path / "base").mkdir()
    base = tasks.base.run(cfg.model, {}, tmp_path / "base")
    assert base.manifest["architecture"] == "Qwen2ForCausalLM"
    base = Artifact(base.path, {"digest": "qwen", **base.manifest})
    (tmp_path / "sft").mkdir()
    sft = tasks.sft.run(cfg.sft.model_copy(update={"seed": 0}), {"base": base, "data": chat_data}, tmp_path / "sft")
    assert sft.manifest["method"] == "lora"
    assert sft.metrics["trainable_parameters"] < sft.metrics["parameters"]
    assert sft.metrics["eval_loss"] < sft.metrics["eval_loss_before"]
    # Trained with Qwen2.5's template: the manifest names it and shows the first (three-turn) row as rendered.
    qwen_sha = hashlib.sha256(QWEN25_TEMPLATE.encode()).hexdigest()
    assert sft.manifest["chat_template"]["sha256"] == qwen_sha and not sft.manifest["chat_template"]["demo"]
    example = sft.manifest["chat_template"]["example"]
    assert example.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>") and example.count("<|im_start|>assistant\n") == 3
    assert (tmp_path / "sft" / "chat_template.jinja").read_text() == QWEN25_TEMPLATE  # saved with the model
    qwen_prompt = "<|im_end|>\n<|im_start|>assistant\n"
    for name, model in (("base", base), ("sft", Artifact(sft.path, {}))):
        (tmp_path / f"eval-{name}").mkdir()
        config = EvaluateConfig(max_new_tokens=4, samples=2, ks=[1, 2], sample_items=4)
        result = tasks.evaluate.run(config, {"benchmarks": tiny_benchmarks, "model": model}, tmp_path / f"eval-{name}")
        # Generated from the ChatML prompt, stopping at <|im_end|>.
        described = result.manifest["chat_template"]
        assert described["sha256"] == qwen_sha and described["end_of_turn"] == "<|im_end|>"
        assert described["example"].endswith(qwen_prompt)
        assert "mean.exact_match" in result.metrics


def test_pickle_only_checkpoint_is_refused(qwen_folder, tmp_path):
    """Weights are read from safetensors only: a folder holding just a pickle is a clear error."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json",):
        (folder / name).write_bytes((qwen_folder / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError) as caught:
        load_causal_lm(folder)
    assert str(folder) in str(caught.value)
    assert "\n" not in str(caught.value)
