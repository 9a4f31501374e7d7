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
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

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
    # BPE with no merges: every character is its own token, an unknown one <unk> (each on its own).
    # The same ids as a word-level vocabulary behind a one-character split, without a regex match
    # and a pre-token per character: 3.9x faster on Alpaca (18.7M characters, one thread: 7.4 s
    # against 28.6 s), which is most of the data stage's length filter on long rows.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
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
    """A saved reward model (a sequence classifier or a `LikelihoodRewardModel`), or a causal-LM
    folder's body under a fresh one-output `score` head."""
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code
    )


# --------------------------------------------------------------------------- the likelihood reward head


class LikelihoodRewardConfig(PreTrainedConfig):
    """Config of `LikelihoodRewardModel`: the causal LM's own config nested as `lm_config`."""

    model_type = "posttrain_likelihood_reward"
    sub_configs_defaults = {"lm_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    lm_config: dict | PreTrainedConfig | None = None
    reference: bool = False  # true: also hold a frozen copy of the initial LM and score β(log π − log π_ref)
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 1  # one scalar reward, what RewardTrainer checks for
        super().__post_init__(**kwargs)


class LikelihoodRewardModel(PreTrainedModel):
    """A reward model that is a causal LM: the score of a sequence is a·Σ_t log p(x_t | x_<t) + b over
    its real tokens (a, b learned scalars in `score`, a starting at 1), minus the same sum under a
    frozen copy of the initial LM when `config.reference` (then a plays DPO's β).

    It answers like a one-label sequence classifier — forward(input_ids, attention_mask).logits has
    shape (batch, 1) — so TRL's RewardTrainer trains it with its Bradley–Terry loss unchanged and
    posttrain.scoring scores it unchanged. The prompt's log-probs are the same for the chosen and the
    rejected reply, so they cancel in the Bradley–Terry difference r(chosen) − r(rejected).
    Registered with AutoConfig / AutoModelForSequenceClassification below, so `load_reward_model`
    loads a saved one without remote code.
    """

    config_class = LikelihoodRewardConfig
    base_model_prefix = "lm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: LikelihoodRewardConfig):
        super().__init__(config)
        self.lm = AutoModelForCausalLM.from_config(config.lm_config)
        self.ref = AutoModelForCausalLM.from_config(config.lm_config).requires_grad_(False) if config.reference else None
        self.score = torch.nn.Linear(1, 1)  # r = a·(log-likelihood) + b; named `score` so peft's SEQ_CLS trains it fully
        self.post_init()

    def _init_weights(self, module):
        if module is self.score:
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_causal_lm(cls, causal_lm, reference: bool = False) -> "LikelihoodRewardModel":
        """Wrap a loaded causal LM (its weights are copied; a = 1, b = 0)."""
        config = LikelihoodRewardConfig(lm_config=causal_lm.config.to_dict(), reference=reference,
                                        pad_token_id=causal_lm.config.pad_token_id)
        model = cls(config).to(causal_lm.dtype)
        state = causal_lm.state_dict()
        model.lm.load_state_dict(state)
        if model.ref is not None:
            model.ref.load_state_dict(state)
        with torch.no_grad():
            model.score.weight.fill_(1.0)
            model.score.bias.zero_()
        return model

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    @staticmethod
    def _sequence_logprob(lm, input_ids, attention_mask) -> torch.Tensor:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (token_logp * attention_mask[:, 1:].to(token_logp.dtype)).sum(-1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logp = self._sequence_logprob(self.lm, input_ids, attention_mask)
        if self.ref is not None:
            with torch.no_grad():  # the reference never trains, whatever its parameters' requires_grad
                ref_logp = self._sequence_logprob(self.ref, input_ids, attention_mask)
            logp = logp - ref_logp
        logits = self.score(logp.unsqueeze(-1).to(self.score.weight.dtype))
        return SequenceClassifierOutput(logits=logits)


AutoConfig.register(LikelihoodRewardConfig.model_type, LikelihoodRewardConfig)
AutoModelForSequenceClassification.register(LikelihoodRewardConfig, LikelihoodRewardModel)


def build_reward_model(init_dir: str | Path, head: str = "classifier", reference: bool = False):
    """The reward model to train from a causal-LM folder: `classifier` — its body under a fresh
    one-output score head (AutoModelForSequenceClassification); `likelihood` — the LM itself scored by
    its log-likelihood (LikelihoodRewardModel)."""
    if head == "classifier":
        return load_reward_model(init_dir)
    if head == "likelihood":
        return LikelihoodRewardModel.from_causal_lm(load_causal_lm(init_dir, dtype="float32"), reference=reference)
    raise ValueError(f"unknown reward head {head!r}: classifier or likelihood")


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
