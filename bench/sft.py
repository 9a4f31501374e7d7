"""SFT throughput on real instruction lengths: padded vs padding-free vs packed, and the stage vs a bare loop.

    .venv/bin/python bench/sft.py                      # 1,500 Alpaca rows, one epoch per mode
    .venv/bin/python bench/sft.py --rows 3000 --batch 16

Alpaca rows from ../shared/realdata/alpaca (instruction + input as the prompt, output as the
reply), a byte-level BPE tokenizer trained here on them (vocabulary 4,000, the demo's chat
template), and a small Llama (hidden 256, 4 layers) built from its config — the same initial
weights for every run. Each run trains one epoch over the same rows at the same micro-batch:
  - the stage (tasks/sft.run: TRL's SFTTrainer as the pipeline runs it) with `batching` padded
    (no length grouping), padding_free and packed (best fit into max_length bins);
  - a bare PyTorch loop on the same model, rows, batch size, AdamW settings and cosine schedule,
    padded, no length grouping: what the stage's padded mode costs over plain PyTorch.
Useful tokens/s = the rows' tokens (no padding) ÷ training seconds (the stage's own clock around
its steps, the loop's around its steps). Ratios are against the stage's padded run, and the
stage's padded run against the bare loop, all in this process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from posttrain.artifacts import Artifact  # noqa: E402
from posttrain.config import SftConfig  # noqa: E402
from posttrain.formatting import ChatFormat, pad_batch  # noqa: E402
from posttrain.jsonl import write_jsonl  # noqa: E402
from posttrain.models import save_pretrained  # noqa: E402

ALPACA = REPO.parent / "shared" / "realdata" / "alpaca" / "alpaca_data.json.gz"


def alpaca_rows(count: int, seed: int) -> list[dict]:
    with gzip.open(ALPACA, "rt") as handle:
        rows = json.load(handle)
    random.Random(seed).shuffle(rows)
    out = []
    for row in rows[:count]:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        out.append({"prompt": prompt, "response": row["output"]})
    return out


def build_base(rows: list[dict], folder: Path):
    """A BPE tokenizer trained on the rows and a small Llama of its vocabulary, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((row["prompt"] + "\n" + row["response"] for row in rows), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=688, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    save_pretrained(LlamaForCausalLM(config), tokenizer, folder)


def bare_loop(base: Path, encoded: list[dict], config: SftConfig, seed: int) -> float:
    """One epoch of plain PyTorch over padded random batches; returns training seconds."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, len(batches))
    pad_id = model.config.pad_token_id
    started = time.perf_counter()
    for batch_rows in batches:
        batch = pad_batch([encoded[i] for i in batch_rows], pad_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tasks import sft

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-sft-"))
    rows = alpaca_rows(args.rows + 50, seed=0)
    base = work / "base"
    build_base(rows, base)
    data = work / "data"
    write_jsonl(data / "instruction" / "train.jsonl", rows[50:])
    write_jsonl(data / "instruction" / "eval.jsonl", rows[:50])
    from posttrain.models import load_tokenizer

    chat = ChatFormat(load_tokenizer(base))
    encoded = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chat.encode_rows(rows[50:], args.max_length)]
    useful = sum(len(e["input_ids"]) for e in encoded)
    lengths = sorted(len(e["input_ids"]) for e in encoded)
    padded_tokens = 0
    order = list(range(len(encoded)))
    random.Random(0).shuffle(order)
    for i in range(0, len(order), args.batch):
        chunk = [len(encoded[j]["input_ids"]) for j in order[i : i + args.batch]]
        padded_tokens += max(chunk) * len(chunk)

    results = {}
    for batching in ("padded", "padding_free", "packed"):
        config = SftConfig(epochs=1, batch_size=args.batch, max_length=args.max_length, lr=1e-3, warmup_steps=10, eval_rows=0, seed=0, batching=batching)
        out = work / f"sft-{batching}"
        out.mkdir()
        metrics = sft.run(config, {"base": Artifact(base, {"digest": "bench", "path": "base"}), "data": Artifact(data, {"digest": "bench"})}, out).metrics
        results[batching] = (metrics["train_seconds"], metrics["train_steps"], metrics["train_sequences"])
    loop_config = SftConfig(epochs=1, batch_size=args.batch, max_length=args.max_length, lr=1e-3, warmup_steps=10)
    loop_seconds = bare_loop(base, encoded, loop_config, seed=0)

    print(f"{len(encoded)} Alpaca rows, {useful:,} tokens (median {lengths[len(lengths) // 2]}, max {lengths[-1]}, cut at {args.max_length}); "
          f"micro-batch {args.batch}; padded batches hold {padded_tokens:,} token slots ({useful / padded_tokens:.0%} useful); 1 torch thread")
    padded_rate = useful / results["padded"][0]
    print(f"{'run':<26} {'steps':>6} {'sequences':>10} {'train s':>8} {'useful tok/s':>13} {'vs padded stage':>16}")
    for batching, (seconds, steps, sequences) in results.items():
        rate = useful / seconds
        print(f"{'stage, ' + batching:<26} {steps:>6} {sequences:>10} {seconds:>8.1f} {rate:>13,.0f} {rate / padded_rate:>15.2f}x")
    loop_rate = useful / loop_seconds
    print(f"{'bare loop, padded':<26} {math.ceil(len(encoded) / args.batch):>6} {len(encoded):>10} {loop_seconds:>8.1f} {loop_rate:>13,.0f} {loop_rate / padded_rate:>15.2f}x")
    print(f"stage (padded) / bare loop (padded): {padded_rate / loop_rate:.2f}x")


if __name__ == "__main__":
    main()
