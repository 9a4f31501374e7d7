"""The reward model over seeds on the demo, and on real hh-rlhf pairs beside a length-only baseline.

    .venv/bin/python bench/reward_study.py                  # both parts
    .venv/bin/python bench/reward_study.py --part demo      # or: --part hh  [--hh-steps 600]

demo: the reward stage as configs/align-study.yaml sets it (init from that config's SFT model,
the demo's sort/add pairs), for seeds 0, 1, 2 — held-out pairwise accuracy with its 95 % Wilson
interval, the calibration of σ(margin) (ECE), and the spread between seeds.

hh: configs/alpaca-hh.yaml's data (Anthropic hh-rlhf helpful-base pairs, read in place from
../shared/realdata) and its tiny character-level model, the reward stage initialised from the base
model for `--hh-steps` steps; scored on the held-out pairs, beside the baseline that prefers the
longer reply (ties half). The base, data and SFT stages are cached in each config's store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.align_study import build_upstream  # noqa: E402
from posttrain.artifacts import Store  # noqa: E402
from posttrain.config import load_config  # noqa: E402
from posttrain.jsonl import read_preference_pairs  # noqa: E402
from posttrain.metrics import wilson_interval  # noqa: E402


def reward_run(cfg, upstream: dict, section, out_dir: Path) -> dict:
    from tasks import reward

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    metrics = reward.run(section, {"init": upstream[section.init_from], "data": upstream["data"]}, out_dir).metrics
    return {**metrics, "seconds": round(time.perf_counter() - started, 1)}


def demo_part(seeds: list[int]) -> None:
    cfg = load_config(REPO / "configs" / "align-study.yaml")
    upstream = build_upstream(cfg, Store((REPO / cfg.store_root).resolve()), ("base", "benchmarks", "data", "sft"))
    root = (REPO / cfg.store_root).resolve() / "reward-study"
    rows = []
    for seed in seeds:
        metrics = reward_run(cfg, upstream, cfg.reward.model_copy(update={"seed": seed}), root / f"seed{seed}")
        rows.append((seed, metrics))
    accuracies = [m["eval_accuracy"] for _, m in rows]
    print(f"demo reward model (init {cfg.reward.init_from}, {cfg.reward.max_steps} steps, {rows[0][1]['train_pairs']} train / {rows[0][1]['eval_pairs']} held-out pairs)")
    print(f"{'seed':>4} {'accuracy':>9} {'95% interval':>16} {'before':>7} {'ECE of σ(margin)':>17} {'seconds':>8}")
    for seed, m in rows:
        print(f"{seed:>4} {m['eval_accuracy']:>9.4f} {m['eval_ci95_low']:>7.3f}–{m['eval_ci95_high']:.3f} {m['eval_before_accuracy']:>7.3f} {m['eval_preference_ece']:>17.4f} {m['seconds']:>8.1f}")
    print(f"spread (max − min): {max(accuracies) - min(accuracies):.4f}; min {min(accuracies):.4f}")


def hh_part(steps: int) -> None:
    cfg = load_config(REPO / "configs" / "alpaca-hh.yaml")
    upstream = build_upstream(cfg, Store((REPO / cfg.store_root).resolve()), ("base", "benchmarks", "data"))
    section = cfg.reward.model_copy(update={"init_from": "base", "max_steps": steps, "seed": 0})
    metrics = reward_run(cfg, upstream, section, (REPO / cfg.store_root).resolve() / "reward-study-hh")
    eval_rows = read_preference_pairs(Path(upstream["data"].path) / "preference" / "eval.jsonl")
    longer = sum(1.0 if len(r["chosen"]) > len(r["rejected"]) else 0.5 if len(r["chosen"]) == len(r["rejected"]) else 0.0 for r in eval_rows)
    n = len(eval_rows)
    low, high = wilson_interval(round(longer), n)
    print(f"hh-rlhf helpful-base: {metrics['train_pairs']} train pairs ({metrics['train_pairs_dropped_too_long']} too long), {n} held-out pairs; "
          f"tiny char model from base, {steps} steps, {metrics['seconds']} s")
    print(f"{'scorer':<28} {'accuracy':>9} {'95% interval':>16}")
    print(f"{'reward model':<28} {metrics['eval_accuracy']:>9.4f} {metrics['eval_ci95_low']:>7.3f}–{metrics['eval_ci95_high']:.3f}")
    print(f"{'prefer the longer reply':<28} {longer / n:>9.4f} {low:>7.3f}–{high:.3f}")
    print(json.dumps({k: metrics[k] for k in ("eval_before_accuracy", "eval_preference_ece", "eval_margin_median")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["demo", "hh", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hh-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("demo", "both"):
        demo_part(args.seeds)
    if args.part in ("hh", "both"):
        hh_part(args.hh_steps)


if __name__ == "__main__":
    main()
