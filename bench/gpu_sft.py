"""SFT throughput on a GPU: a Qwen2-0.5B-shaped model at sequence 2048 in bf16, the stage against a bare loop.

    python bench/gpu_sft.py --out $OUT/gpu_sft.json      # on the GPU machine (bench/gpu_check.sh calls it)
    .venv/bin/python bench/gpu_sft.py --shape tiny --seq 256 --steps 6 --micro-batch 2   # the script itself, on a CPU

Builds the model from Qwen2-0.5B's config (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings; no download) with a byte-level BPE tokenizer trained here on
generated rows and carrying Qwen2.5's ChatML template (TRL's copy). The rows' lengths follow a
log-normal around Alpaca's (median ≈ 250 tokens), packed best-fit into `--seq`-token bins.
Runs, each on the same initial weights and the same bins, in this process:
  - the stage (tasks/sft.run, TRL's SFTTrainer as the pipeline runs it), `batching: packed`, for
    `method` full, lora and qlora (qlora only where bitsandbytes has a CUDA build);
  - a bare PyTorch loop: the same model, bins, micro-batch, AdamW settings, cosine schedule, bf16
    autocast and gradient clipping — what the stage costs over plain PyTorch;
  - the same bare loop with attention row by row (posttrain.row_attention, the stage's choice on
    the CPU) instead of transformers' block-diagonal mask: whether the GPU should use it too;
  - the bare loop under torch.compile (`--no-compile` skips it): the closest this script gets to
    the 40 % MFU measured with compiled bare transformers.
Tokens/s are useful (non-pad) tokens per second, steady state: the first `--warmup` steps (CUDA
start-up, allocator growth, compilation) are left out of both the stage's and the loop's figure.
MFU = (6·N + 12·layers·hidden·seq) × tokens/s ÷ peak, N = every matmul weight including the LM
head (the embedding lookup is not a matmul), peak = 989 TFLOP/s dense bf16 (H100/H200 SXM).
LoRA and QLoRA do about 4N per token, not 6N (no weight gradients for the frozen base); their MFU
is quoted on the same 6N "model FLOPs" so the rows compare as work done per second per token.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.env import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402

from posttrain.artifacts import Artifact  # noqa: E402
from posttrain.config import SftConfig  # noqa: E402
from posttrain.jsonl import write_jsonl  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
SHAPES = {
    # Qwen2-0.5B's config.json (Qwen/Qwen2-0.5B, also Qwen2.5-0.5B)
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    # the same architecture, small enough to check the script on a CPU
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128, vocab_size=4096),
}


def generated_rows(count: int, seed: int) -> list[dict]:
    """Instruction rows of pseudo-words, lengths log-normal like Alpaca's (prompt ≈ 20, reply ≈ 150 words)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tre", "su", "van", "dor", "pe", "qui", "ne", "ros", "ta", "gu", "li", "bem"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def text(median: float) -> str:
        n = max(3, int(rng.lognormvariate(math.log(median), 0.7)))
        return " ".join(rng.choice(words) for _ in range(n))

    return [{"prompt": text(20), "response": text(150)} for _ in range(count)]


def build_base(rows: list[dict], shape: str, seq: int, folder: Path) -> dict:
    """The tokenizer (BPE trained on the rows, ChatML template) and the model from its config, saved to `folder`."""
    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import save_pretrained

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        (row["prompt"] + "\n" + row["response"] for row in rows[:2000]),
        trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    torch.manual_seed(0)
    dims = SHAPES[shape]
    config = Qwen2Config(
        **dims, max_position_embeddings=max(seq, 2048), tie_word_embeddings=True, rope_theta=1e6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    save_pretrained(Qwen2ForCausalLM(config), tokenizer, folder)
    return dims


def matmul_parameters(dims: dict) -> int:
    """Every matmul weight per token: attention q/k/v/o, the MLP's three, and the LM head."""
    hidden, layers, heads, kv_heads = dims["hidden_size"], dims["num_hidden_layers"], dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * dims["intermediate_size"]
    return layers * (attention + mlp) + hidden * dims["vocab_size"]


def mfu(tokens_per_second: float, dims: dict, seq: int) -> float:
    flops_per_token = 6 * matmul_parameters(dims) + 12 * dims["num_hidden_layers"] * dims["hidden_size"] * seq
    return flops_per_token * tokens_per_second / PEAK_BF16_FLOPS


class SteadyClock:
    """Useful tokens and seconds after the first `warmup` optimizer steps (a TrainerCallback's hooks)."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.tokens_at_start = warmup, None, 0
        self.seconds = self.tokens = 0.0

    def mark(self, step: int, tokens_seen: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step == self.warmup:
            self.started, self.tokens_at_start = now, tokens_seen
        elif self.started is not None:
            self.seconds, self.tokens = now - self.started, tokens_seen - self.tokens_at_start

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.nan


def stage_run(method: str, base: Path, data: Path, args, work: Path) -> dict:
    """tasks/sft.run as the pipeline runs it, with a callback that only reads the clock."""
    from tasks import sft

    clock = SteadyClock(args.warmup)
    original = sft.ProgressCallback

    class TimedProgress(original):
        """The stage's own progress callback, plus the steady-state clock."""

        def on_step_end(self, _args, state, control, **kwargs):
            super().on_step_end(_args, state, control, **kwargs)
            clock.mark(state.global_step, int(state.num_input_tokens_seen))

    config = SftConfig(
        method=method, max_steps=args.steps, batch_size=args.micro_batch, max_length=args.seq, batching="packed",
        lr=2e-4 if method != "full" else 2e-5, warmup_steps=2, eval_rows=0, seed=0,
    )
    sft.ProgressCallback = TimedProgress  # the stage builds its callback by this name; restored below
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    out = work / f"sft-{method}"
    out.mkdir()
    try:
        metrics = sft.run(config, {"base": Artifact(base, {"digest": "bench", "path": "base"}), "data": Artifact(data, {"digest": "bench"})}, out).metrics
    finally:
        sft.ProgressCallback = original
    return {
        "steps": metrics["optimizer_steps"], "tokens_per_second": clock.rate, "tokens_per_second_whole": metrics["tokens_per_second"],
        "peak_gib": peak_gib(), "trainable": metrics["trainable_parameters"], "final_loss": metrics.get("final_train_loss"),
    }


def fitting_rows(rows: list[dict], base: Path, seq: int) -> list[dict]:
    """The rows whose whole chat fits in `seq` tokens, as the data stage's length filter keeps them."""
    from posttrain.formatting import ChatFormat
    from posttrain.models import load_tokenizer

    encoded = ChatFormat(load_tokenizer(base)).encode_rows(rows, 10**9)
    return [row for row, e in zip(rows, encoded) if len(e["input_ids"]) <= seq]


def packed_bins(base: Path, data: Path, seq: int) -> list[dict]:
    """The bins the stage trains on: the same encoding (the model's chat template) and best-fit packing."""
    from datasets import Dataset
    from trl import pack_dataset

    from posttrain.formatting import ChatFormat
    from posttrain.jsonl import read_instruction_rows
    from posttrain.models import load_tokenizer

    encoded = ChatFormat(load_tokenizer(base)).encode_rows(read_instruction_rows(data / "instruction" / "train.jsonl"), seq)
    dataset = pack_dataset(Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]), seq, strategy="bfd")
    return list(dataset)


def bare_loop(base: Path, bins: list[dict], args, compiled: bool, row_by_row: bool = False) -> dict:
    """Plain PyTorch on the same bins: AdamW (β2 0.95), cosine schedule, bf16 autocast on the GPU, clip 1.0.
    `row_by_row`: attention per packed row (posttrain.row_attention, what the stage uses on the CPU)
    instead of transformers' block-diagonal mask, to tell whether the GPU should use it too."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from posttrain.row_attention import rows_attention
    from tasks.sft import PackedRowsCollator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=torch.float32).to(device).train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=device == "cuda")
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, args.steps)
    collate = PackedRowsCollator(model.config.pad_token_id)
    order = list(range(len(bins)))
    random.Random(0).shuffle(order)
    clock, tokens = SteadyClock(args.warmup), 0
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with rows_attention(model) if row_by_row else nullcontext():
        for step in range(args.steps):
            chunk = [bins[order[(step * args.micro_batch + i) % len(order)]] for i in range(args.micro_batch)]
            batch = {key: value.to(device, non_blocking=True) for key, value in collate(chunk).items()}
            with autocast:
                loss = forward(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(len(b["input_ids"]) for b in chunk)
            clock.mark(step + 1, tokens)
    return {"steps": args.steps, "tokens_per_second": clock.rate, "peak_gib": peak_gib(), "final_loss": float(loss.detach())}


def peak_gib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    from posttrain.training import peak_rss_mb

    return round(peak_rss_mb() / 1024, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8, help="packed bins per optimizer step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="posttrain-gpu-sft-"))
    base, data = work / "base", work / "data"
    tokens_wanted = args.steps * args.micro_batch * args.seq * 1.2
    rows = generated_rows(max(300, int(tokens_wanted / 220)), seed=0)
    dims = build_base(rows, args.shape, args.seq, base)
    rows = fitting_rows(rows, base, args.seq)
    write_jsonl(data / "instruction" / "train.jsonl", rows)
    write_jsonl(data / "instruction" / "eval.jsonl", [])
    bins = packed_bins(base, data, args.seq)
    fill = sum(len(b["input_ids"]) for b in bins) / (len(bins) * args.seq)

    results: dict[str, dict] = {}
    for label, run in [("bare loop, full", lambda: bare_loop(base, bins, args, compiled=False)),
                       ("bare loop, full, row by row", lambda: bare_loop(base, bins, args, compiled=False, row_by_row=True))] + (
        [] if args.no_compile or not cuda else [("bare loop, full, compiled", lambda: bare_loop(base, bins, args, compiled=True))]
    ) + [(f"stage, {method}", lambda method=method: stage_run(method, base, data, args, work)) for method in args.methods]:
        if label == "stage, qlora" and not cuda:
            results[label] = {"skipped": "needs a CUDA GPU"}
            continue
        try:
            results[label] = run()
        except Exception as exc:  # one failed run (say, out of memory) still leaves the others' figures
            results[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        if cuda:
            torch.cuda.empty_cache()
        print(label, results[label], flush=True)

    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{device}; {args.shape} ({matmul_parameters(dims) / 1e6:.0f}M matmul weights), sequence {args.seq}, "
          f"{args.micro_batch} packed bins per step ({fill:.0%} full), {args.steps} steps, tokens/s after step {args.warmup}")
    loop = results["bare loop, full"].get("tokens_per_second", math.nan)
    print(f"{'run':<28} {'tokens/s':>10} {'MFU':>7} {'vs bare loop':>13} {'peak GiB':>9} {'final loss':>11}")
    for label, row in results.items():
        if "tokens_per_second" not in row:
            print(f"{label:<28} {row.get('error') or row.get('skipped')}")
            continue
        rate = row["tokens_per_second"]
        print(f"{label:<28} {rate:>10,.0f} {mfu(rate, dims, args.seq):>7.1%} {rate / loop:>12.2f}x {row['peak_gib']:>9.2f} {row['final_loss']:>11.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "shape": args.shape, "seq": args.seq, "micro_batch": args.micro_batch, "fill": fill, "results": results}, indent=1))


if __name__ == "__main__":
    main()
