"""Seconds per RL step, split into generation and training, and generated tokens/s, per method.

    .venv/bin/python bench/rl_step.py                       # configs/align-study.yaml, 30 steps each
    .venv/bin/python bench/rl_step.py --steps 60

Runs PPO and GRPO for `--steps` steps from the study config's SFT model (built once, cached in its
store) with the config's settings, and reads their per-step history: generation (sampling the
rollouts) against the rest of the step (log-probs, rewards, advantages, the updates). DPO has no
rollout per step; its row is the stage's own seconds per training step, and with on-policy pairs
the one-off sampling of the pairs. Prints one table; the first step of each run is left out (warm-up).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.align_study import build_upstream, run_method  # noqa: E402
from posttrain.artifacts import Store  # noqa: E402
from posttrain.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/align-study.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / args.config)
    upstream = build_upstream(cfg, Store((REPO / cfg.store_root).resolve()))
    scratch = Path(tempfile.mkdtemp(prefix="posttrain-rl-step-"))
    rows = []
    for method in ("ppo", "grpo"):
        section = getattr(cfg.align, method).model_copy(update={"max_steps": args.steps})
        seconds, _, manifest = run_method(method, section, upstream, scratch / method)
        history = manifest["history"][1:]
        generation = sum(h["generation_seconds"] for h in history) / len(history)
        training = sum(h["train_seconds"] for h in history) / len(history)
        tokens = sum(h["generated_tokens_per_second"] for h in history) / len(history)
        sequences = section.prompts_per_step * getattr(section, "group_size", 1)
        rows.append((method, sequences, generation, training, tokens, seconds))
    section = cfg.align.dpo.model_copy(update={"max_steps": args.steps})
    started = time.perf_counter()
    _, metrics, _ = run_method("dpo", section, upstream, scratch / "dpo")
    rows.append(("dpo", section.batch_size, 0.0, metrics["seconds_per_step"], 0.0, time.perf_counter() - started))

    print(f"config {args.config}, {args.steps} steps per method, 1 torch thread; the first step left out")
    print(f"{'method':<6} {'sequences/step':>15} {'generation s/step':>18} {'training s/step':>16} {'share generating':>17} {'generated tok/s':>16} {'stage s':>8}")
    for method, sequences, generation, training, tokens, seconds in rows:
        share = generation / (generation + training) if generation + training else 0.0
        print(f"{method:<6} {sequences:>15} {generation:>18.3f} {training:>16.3f} {share:>16.0%} {tokens:>16,.0f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
