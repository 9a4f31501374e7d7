"""Load a model and tokenizer from a Hugging Face id or folder, or build the tiny offline demo model.

    model, tokenizer = build_tiny(TinyModelConfig(), seed=0)       # no download, ~0.1M params
    model = load_causal_lm("Qwen/Qwen2.5-0.5B")                   # or a local folder
    save_pretrained(model, tokenizer, out_dir)                     # safetensors + config + tokenizer

Weights are only ever read from safetensors (`use_safetensors=True`): a pickle checkpoint is
refused rather than unpickled. Remote code runs only when the config says `trust_remote_code: true`.
"""

from __future__ import annotations

import logging
import os
import string
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from posttrain import failpoints
from posttrain.formatting import DEMO_CHAT_TEMPLATE, ensure_chat_template

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


class ModelLoadError(RuntimeError):
    """A model path or id that cannot be loaded, said in one line."""


def _load_error(what: str, exc: Exception) -> ModelLoadError:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "custom code" in line:  # refused, not run: transformers only executes it with trust_remote_code
        line += " Refused: set model.trust_remote_code: true only for code you trust."
    return ModelLoadError(f"{what}: {line}")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII, built with `tokenizers`.

    Character level beats BPE for a tiny model on string skills (FIELD_NOTES): BPE cannot learn
    reverse/upper/copy because it splits an operand differently from its answer.
    """
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character is its own token; "." alone would not match newlines, and a run of them would
    # become one unknown token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS, padding_side="right")
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE  # "Q: {prompt}\nA: {response}</s>", saved with the tokenizer
    return tokenizer


def build_tiny(tiny, seed: int, tokenizer: PreTrainedTokenizerFast | None = None):
    """A small Llama-architecture model with tied embeddings, initialised from `seed`."""
    tokenizer = tokenizer or build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _dtype(name: str):
    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(f"tokenizer {name_or_path}", exc) from exc
    if tokenizer.pad_token is None:
        # Many base models ship without a pad token; padding is always masked, so EOS is safe to reuse.
        tokenizer.pad_token = tokenizer.eos_token
    # A base model without a chat template gets the demo's, so every stage renders one way.
    return ensure_chat_template(tokenizer)


def load_causal_lm(
    name_or_path: str | Path,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    **kwargs,
):
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(name_or_path),
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=_dtype(dtype),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(f"model {name_or_path}", exc) from exc


def load_reward_model(path: str | Path, trust_remote_code: bool = False):
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def save_pretrained(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    failpoints.reach("save", path=str(out_dir / "tokenizer.json"))
    tokenizer.save_pretrained(out_dir)


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def pick_device(preference: str | None = None) -> torch.device:
    """`runtime.device` (auto, cpu, cuda), which the runner passes as POSTTRAIN_DEVICE."""
    preference = preference or os.environ.get("POSTTRAIN_DEVICE", "auto")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def folder_size_bytes(folder: Path, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.suffix in suffixes)


# Loggers through which bitsandbytes reports once per matmul (int8 on CPU: "inputs will be cast from
# torch.float32 to float16") or on import (no `kernels` package for its optional CPU 4-bit kernel).
BNB_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


@contextmanager
def quiet_bitsandbytes():
    """Silence bitsandbytes' per-call log lines and warnings for the duration of the block only.

    The int8 message is a `logging` warning, not a `warnings.warn`, so a warnings filter alone does
    not silence it; both are scoped here and restored on exit.
    """
    loggers = [logging.getLogger(name) for name in BNB_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"bitsandbytes(\.|$)")
            warnings.filterwarnings("ignore", message=r".*(MatMul8bitLt|bnb_4bit_compute_dtype).*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
