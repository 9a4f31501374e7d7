"""The reward model over seeds on the demo, and on real hh-rlhf pairs beside a length-only baseline.

    .venv/bin/python bench/reward_study.py                  # both parts
    .venv/bin/python bench/reward_study.py --part demo      # or: --part hh  [--hh-steps 600]
    .venv/bin/python bench/reward_study.py --part demo --set reward.head=classifier --set reward.lr=1e-3  # the classifier control

demo: the reward stage as configs/align-study.yaml sets it (init from that config's SFT model,
the demo's sort/add pairs), for seeds 0, 1, 2 — held-out pairwise accuracy with its 95 % Wilson
interval, the calibration of σ(margin) (ECE), and the spread between seeds; for the likelihood
head also the untrained head's accuracy on the fresh pairs (the init model's log-likelihood ratio). The data stage holds
out only 70 pairs (one pair = 1.4 points), so each model is also scored on `--fresh` new pairs
drawn from the same generator with another seed, half per skill, none of whose prompts (compared
lower-cased, punctuation and spacing removed) occurs anywhere in the data artifact — not in the
preference, instruction or prompt rows of either split — so neither the reward model nor the SFT
model under it has seen them. `--set` overrides the config (e.g. the reward section, for a control).

hh: configs/alpaca-hh.yaml's data (Anthropic hh-rlhf helpful-base pairs, read in place from
../shared/realdata) and its tiny character-level model, the reward stage initialised from the base
model for `--hh-steps` steps; scored on the held-out pairs, beside the baseline that prefers the
longer reply (ties half). The base, data and SFT stages are cached in each config's store.
"""

from __future__ import annotations

import argparse
import json
import re
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


def _prompt_key(prompt: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", prompt.lower()).split())


def fresh_pairs(cfg, data_dir: Path, count: int, seed: int = 12345) -> list[dict]:
    """`count` new preference pairs from the generator of the config's preference source (half per
    skill), none of whose prompts occurs in any split of any role of the data artifact."""
    from posttrain import skills
    from posttrain.jsonl import read_jsonl

    generated = [source.generate for source in cfg.data.sources if source.role == "preference" and source.generate is not None]
    if not generated or count <= 0:
        return []
    seen = {_prompt_key(row["prompt"]) for path in sorted(data_dir.glob("*/*.jsonl")) for row in read_jsonl(path) if isinstance(row.get("prompt"), str)}
    names = skills.skill_names(generated[0].skills)
    quota = {name: count // len(names) for name in names}
    pairs = []
    for row in skills.generate_rows("preference", rows=20 * count, seed=seed, skills=names)[0]:
        key = _prompt_key(row["prompt"])
        if key not in seen and quota[row["skill"]] > 0:
            seen.add(key)  # each prompt once
            quota[row["skill"]] -= 1
            pairs.append(row)
    return pairs


def fresh_metrics(model_dir: Path, rows: list[dict], max_length: int, model=None) -> dict:
    """Pairwise accuracy on `rows` of the reward model saved in `model_dir` (or of `model`, with
    model_dir's tokenizer)."""
    from posttrain.formatting import ChatFormat
    from posttrain.models import load_reward_model, load_tokenizer
    from posttrain.scoring import pair_ids, pairwise_metrics

    tokenizer = load_tokenizer(model_dir)
    pairs = pair_ids(ChatFormat(tokenizer).split_replies(rows))
    model = model if model is not None else load_reward_model(model_dir)
    metrics = pairwise_metrics(model, pairs, rows, tokenizer.pad_token_id, max_length, prefix="fresh_")
    low, high = wilson_interval(round(metrics["fresh_accuracy"] * len(rows)), len(rows))
    return {**metrics, "fresh_ci95_low": low, "fresh_ci95_high": high}


def demo_part(seeds: list[int], overrides: list[str], fresh_count: int) -> None:
    cfg = load_config(REPO / "configs" / "align-study.yaml", overrides)
    upstream = build_upstream(cfg, Store((REPO / cfg.store_root).resolve()), ("base", "benchmarks", "data", "sft"))
    root = (REPO / cfg.store_root).resolve() / "reward-study"
    label = "".join(f"-{re.sub(r'[^A-Za-z0-9.=_]', '', item)}" for item in overrides)
    fresh = fresh_pairs(cfg, Path(upstream["data"].path), fresh_count)
    rows = []
    for seed in seeds:
        section = cfg.reward.model_copy(update={"seed": seed})
        out_dir = root / f"seed{seed}{label}"
        metrics = reward_run(cfg, upstream, section, out_dir)
        if fresh:
            metrics.update(fresh_metrics(out_dir, fresh, section.max_length))
        rows.append((seed, metrics))
    r = cfg.reward
    untrained = None
    if fresh and r.head == "likelihood" and not r.reference:
        # The untrained likelihood head is the init model's own log-likelihood ratio, the same for every seed.
        from posttrain.models import build_reward_model

        init_dir = Path(upstream[r.init_from].path)
        untrained = fresh_metrics(init_dir, fresh, r.max_length, model=build_reward_model(init_dir, r.head))
    print(f"demo reward model {' '.join(overrides)} ({r.head} head{' − frozen reference' if r.head == 'likelihood' and r.reference else ''}, init {r.init_from}, {r.method}, {r.max_steps} steps × {r.batch_size} pairs, lr {r.lr}; "
          f"{rows[0][1]['train_pairs']} train / {rows[0][1]['eval_pairs']} held-out pairs; {len(fresh)} fresh pairs)")
    if untrained:
        print(f"untrained {r.head} head ({r.init_from} model's log p(chosen) − log p(rejected)) on the fresh pairs: {untrained['fresh_accuracy']:.4f} "
              f"({untrained['fresh_ci95_low']:.3f}–{untrained['fresh_ci95_high']:.3f}), sort {untrained.get('fresh_accuracy_sort', float('nan')):.3f}, "
              f"add {untrained.get('fresh_accuracy_add', float('nan')):.3f}")
    print(f"{'seed':>4} {'held-out':>9} {'95% interval':>14} {'before':>7} {'ECE':>7} {'fresh':>7} {'95% interval':>14} {'fresh sort':>10} {'fresh add':>10} {'seconds':>8}")
    for seed, m in rows:
        fresh_cells = (f"{m['fresh_accuracy']:>7.4f} {m['fresh_ci95_low']:>6.3f}–{m['fresh_ci95_high']:.3f} "
                       f"{m.get('fresh_accuracy_sort', float('nan')):>10.3f} {m.get('fresh_accuracy_add', float('nan')):>10.3f}") if fresh else ""
        print(f"{seed:>4} {m['eval_accuracy']:>9.4f} {m['eval_ci95_low']:>6.3f}–{m['eval_ci95_high']:.3f} {m['eval_before_accuracy']:>7.3f} "
              f"{m['eval_preference_ece']:>7.4f} {fresh_cells} {m['seconds']:>8.1f}")
    for key, name in (("eval_accuracy", "held-out"), ("fresh_accuracy", "fresh")):
        values = [m[key] for _, m in rows if key in m]
        if values:
            print(f"{name}: spread (max − min) {max(values) - min(values):.4f}; min {min(values):.4f}; mean {sum(values) / len(values):.4f}")


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="demo config override, e.g. reward.lr=1e-3")
    parser.add_argument("--fresh", type=int, default=1000, help="new held-out pairs for the demo part (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("demo", "both"):
        demo_part(args.seeds, args.set, args.fresh)
    if args.part in ("hh", "both"):
        hh_part(args.hh_steps)


if __name__ == "__main__":
    main()
