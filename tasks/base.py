"""Base stage: the starting model and tokenizer, as an artifact like any other.

    run(ModelConfig(), {}, out_dir)                             # builds the tiny offline demo model
    run(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B"), {}, out)  # or loads an HF id / local folder

The model is saved into the store (safetensors, config, tokenizer), so every later stage and the
data filters read the same weights and the same tokenizer from one content-addressed folder, and
a change of upstream weights changes the digest that downstream fingerprints depend on. A hub id
is loaded at the commit its cache key was computed from (posttrain.outside.resolve_hub_revision).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.artifacts import Artifact
from posttrain.config import ModelConfig
from posttrain.models import build_tiny, count_parameters, load_causal_lm, load_tokenizer, save_pretrained
from posttrain.outside import resolve_hub_revision


def run(config: ModelConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    if config.name_or_path is None:
        model, tokenizer = build_tiny(config.tiny, seed=config.seed or 0)
        origin = "tiny-llama (built from config)"
    else:
        revision = config.revision
        if config.outside_inputs()["model.name_or_path"].kind == "hub_model":
            # The commit the cache key was computed from (memoised), not whatever `main` is by now.
            revision = resolve_hub_revision("model", config.name_or_path, config.revision)
        tokenizer = load_tokenizer(config.name_or_path, revision, config.trust_remote_code)
        model = load_causal_lm(config.name_or_path, revision, config.trust_remote_code, config.dtype)
        origin = config.name_or_path if revision is None else f"{config.name_or_path}@{revision}"
        check_vocabulary(config.name_or_path, tokenizer, model)
    save_pretrained(model, tokenizer, out_dir)
    metrics = {"parameters": count_parameters(model), "vocab_size": len(tokenizer)}
    return Artifact.draft(out_dir, metrics, origin=origin, architecture=type(model).__name__)


def check_vocabulary(name: str, tokenizer, model) -> None:
    """A tokenizer with ids past the model's embedding table (another model's tokenizer) would fail
    in the middle of a later stage with an index error deep inside torch; say so here. Fewer ids
    than rows is normal (embeddings padded to a multiple of 64 or 128)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: "
            "they are not the same model's (check the folder's tokenizer files)"
        )
