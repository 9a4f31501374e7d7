"""Quantization stage: bitsandbytes NF4 and int8 copies of a model, with their size and quality cost.

    run(QuantizeConfig(methods=["nf4", "int8"]), {"source": sft, "data": data}, out_dir)
    python -m tasks.quantize --config quantize.json --inputs inputs.json --out DIR

For each method, `out_dir/<method>/` is a Hugging Face folder (safetensors + config with its
`quantization_config` + tokenizer) that a plain `AutoModelForCausalLM.from_pretrained(folder)`
reloads, on the CPU too:

    nf4   4-bit NormalFloat weights (BitsAndBytesConfig load_in_4bit, compute in float32)
    int8  8-bit LLM.int8() weights (BitsAndBytesConfig load_in_8bit)

Embeddings and the (tied) output head stay unquantized, so a tiny model shrinks far less than the
bit width suggests (FIELD_NOTES). On CPUs with AVX512-BF16, bitsandbytes 0.50 runs 4-bit layers
through a packed kernel that asserts out_features % 32 == 0 and in_features % 64 == 0 (the
quantization block); layers of other shapes (the demo's intermediate size 176) are therefore left
unquantized in the nf4 folder, on every machine, so a folder made anywhere runs everywhere. The
manifest lists them (`nf4_skipped_modules`) and `nf4_quantized_fraction` says how much was quantized.

Every quantized model is measured after a save-and-reload round trip, i.e. exactly what later
stages get: weight bytes against the source, eval-split completion loss and its delta, top-1
agreement with the source's predictions on completion positions, reload seconds, and whether greedy
generate() reproduces the source's continuations. The manifest's `variants` names the subfolders
(the evaluate stage scores each one).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from posttrain import formatting
from posttrain.artifacts import Artifact
from posttrain.config import QuantizeConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_instruction_rows
from posttrain.models import folder_size_bytes, load_causal_lm, load_tokenizer, pick_device, quiet_bitsandbytes
from posttrain.scoring import completion_scores

IGNORE = formatting.IGNORE_INDEX
GENERATE_PROMPTS, GENERATE_TOKENS = 4, 8

# bitsandbytes' packed CPU kernel for 4-bit weights (functional._convert_weight_packed_for_cpu).
CPU_4BIT_BLOCK_N = 32
NF4_BLOCKSIZE = 64

def bnb_config(method: str, skip_modules: list[str]) -> BitsAndBytesConfig:
    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip_modules,  # the name is historical: it applies to 4-bit too
        )
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    raise ValueError(f"quantize.methods: unknown method {method!r} (known: nf4, int8)")


def output_head_names(model) -> list[str]:
    """The output projection(s): kept in full precision (tied to the embeddings in the tiny model)."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules() if module is head]


def nf4_incompatible_linears(model) -> list[str]:
    """Linear layers whose shape bitsandbytes' packed CPU 4-bit kernel rejects (see module docstring)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module.out_features % CPU_4BIT_BLOCK_N or module.in_features % NF4_BLOCKSIZE)
    ]


def quantized_fraction(model) -> float:
    """Share of linear-layer weights (output head excluded) held in a bitsandbytes layer."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    total = quantized = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            size = module.in_features * module.out_features  # Linear4bit's weight tensor is packed
            total += size
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                quantized += size
    return quantized / max(total, 1)


# ----------------------------------------------------------------------------- measurement




@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """A few greedy tokens per prompt (rendered with the chat template), one prompt at a time (no
    padding to get wrong)."""
    device = next(model.parameters()).device
    outputs = []
    for ids in ChatFormat(tokenizer).prompt_ids([{"prompt": prompt} for prompt in prompts]):
        encoded = torch.tensor([ids], device=device)
        generated = model.generate(
            input_ids=encoded, attention_mask=torch.ones_like(encoded), max_new_tokens=GENERATE_TOKENS, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(generated[0, encoded.shape[1] :].tolist())
    return outputs


# ----------------------------------------------------------------------------- the stage


def run(config: QuantizeConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    for name in ("source", "data"):
        if name not in inputs:
            raise ValueError(f"quantize: missing input {name!r} (expected: source, data)")
    if not config.methods or len(set(config.methods)) != len(config.methods):
        raise ValueError(f"quantize.methods: need one or more distinct methods, got {config.methods}")
    source_dir, data_dir = Path(inputs["source"].path), Path(inputs["data"].path)
    device = pick_device()

    tokenizer = load_tokenizer(source_dir)
    source = load_causal_lm(source_dir).to(device)
    eval_path = data_dir / "instruction" / "eval.jsonl"
    rows = read_instruction_rows(eval_path)[: config.eval_rows]
    if not rows:
        raise ValueError(f"{eval_path}: no rows to measure the quantization loss on")
    max_length = source.config.max_position_embeddings
    examples = ChatFormat(tokenizer).encode_rows(rows, max_length)
    source_loss, source_predictions = completion_scores(source, examples, tokenizer.pad_token_id)
    prompts = [row["prompt"] for row in rows[:GENERATE_PROMPTS]]
    source_continuations = greedy_continuations(source, tokenizer, prompts)
    source_bytes = folder_size_bytes(source_dir)
    keep_full = output_head_names(source)
    skipped_nf4 = nf4_incompatible_linears(source)
    del source

    metrics: dict = {
        "source_bytes": source_bytes,
        "source_eval_loss": round(source_loss, 5),
        "eval_rows": len(rows),
        "eval_positions": int(source_predictions.numel()),
    }
    manifest_extra: dict = {"variants": list(config.methods)}
    for method in config.methods:
        folder = out_dir / method
        skip = keep_full + [name for name in skipped_nf4 if name not in keep_full] if method == "nf4" else keep_full
        with quiet_bitsandbytes():
            started = time.perf_counter()
            quantized = AutoModelForCausalLM.from_pretrained(
                str(source_dir),
                quantization_config=bnb_config(method, skip),
                device_map={"": device},
                use_safetensors=True,
            )
            quantize_seconds = time.perf_counter() - started
            # Save before any forward pass: bnb re-packs 4-bit weights in place on the first CPU call.
            quantized.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            del quantized

            # Measure what later stages will load: the saved folder, reloaded the ordinary way.
            started = time.perf_counter()
            reloaded = load_causal_lm(folder, device_map={"": device})
            load_seconds = time.perf_counter() - started
            loss, predictions = completion_scores(reloaded, examples, tokenizer.pad_token_id)
            continuations = greedy_continuations(reloaded, tokenizer, prompts)
            fraction = quantized_fraction(reloaded)
            del reloaded

        size = folder_size_bytes(folder)
        metrics.update(
            {
                f"{method}_bytes": size,
                f"{method}_size_ratio": round(size / source_bytes, 4),
                f"{method}_eval_loss": round(loss, 5),
                f"{method}_loss_delta": round(loss - source_loss, 5),
                f"{method}_agreement": round(float((predictions == source_predictions).float().mean()), 4),
                f"{method}_generate_match": round(
                    sum(a == b for a, b in zip(continuations, source_continuations)) / len(prompts), 4
                ),
                f"{method}_quantized_fraction": round(fraction, 4),
                f"{method}_quantize_seconds": round(quantize_seconds, 3),
                f"{method}_load_seconds": round(load_seconds, 3),
            }
        )
        if method == "nf4":
            manifest_extra["nf4_skipped_modules"] = [name for name in skip if name not in keep_full]
    return Artifact.draft(out_dir, metrics, **manifest_extra)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, QuantizeConfig)
