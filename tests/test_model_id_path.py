"""The `model.name_or_path` code path (what configs/qwen2.5-0.5b.yaml uses), on a locally built
Qwen2-shaped folder with a locally trained byte-level BPE tokenizer — no hub access here."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import tasks.base
import tasks.evaluate
import tasks.sft
from posttrain import skills
from posttrain.artifacts import Artifact
from posttrain.config import EvaluateConfig, load_config
from posttrain.models import ModelLoadError, load_causal_lm

QWEN_CONFIG = "configs/qwen2.5-0.5b.yaml"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    rng = random.Random(0)
    corpus = [f"Q: {p}\nA: {a}" for p, a in (skills.sample(name, rng) for name in list(skills.SKILLS) * 200)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")  # no pad token, like Qwen base
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_qwen_config_runs_base_sft_lora_and_evaluate_on_local_folder(qwen_folder, tiny_data, tiny_benchmarks, tmp_path):
    cfg = load_config(QWEN_CONFIG, [f"model.name_or_path={qwen_folder}", "model.dtype=float32", "sft.max_steps=6", "sft.batch_size=8"])
    (tmp_path / "base").mkdir()
    base = tasks.base.run(cfg.model, {}, tmp_path / "base")
    assert base.manifest["architecture"] == "Qwen2ForCausalLM"
    base = Artifact(base.path, {"digest": "qwen", **base.manifest})
    (tmp_path / "sft").mkdir()
    sft = tasks.sft.run(cfg.sft.model_copy(update={"seed": 0}), {"base": base, "data": tiny_data}, tmp_path / "sft")
    assert sft.manifest["method"] == "lora"
    assert sft.metrics["trainable_parameters"] < sft.metrics["parameters"]
    assert sft.metrics["eval_loss"] < sft.metrics["eval_loss_before"]
    (tmp_path / "eval").mkdir()
    inputs = {"benchmarks": tiny_benchmarks, "base": base, "sft": Artifact(sft.path, {})}
    result = tasks.evaluate.run(EvaluateConfig(max_new_tokens=4, limit_per_skill=1), inputs, tmp_path / "eval")
    assert set(result.manifest["models"]) == {"base", "sft"}


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
