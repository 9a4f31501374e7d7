"""The alignment study: each method against honest controls, over several seeds, on one SFT model.

    .venv/bin/python bench/align_study.py                          # configs/align-study.yaml, seeds 0 1 2
    .venv/bin/python bench/align_study.py --seeds 0 --methods grpo  # one method, one seed
    .venv/bin/python bench/align_study.py --methods ppo --set align.ppo.critic_init=policy  # a config variant

base → data → sft → reward are built once through the runner (cached in the config's store). Then,
for each seed and each method of `align.methods`:
  - the method as configured;
  - the same method with its NLL terms off (DPO: `sft_weight` and `replay_weight` 0; PPO and GRPO:
    `replay_weight` 0) — what the RL or preference signal does on its own;
  - for DPO with on-policy pairs, the same DPO on the data's generated "plausible wrong" pairs;
  - the control: continued SFT of the same SFT model on the targeted prompts' correct answers, with
    the same replay of SFT rows the method gets, for the same wall time the method took. SFT sits on
    the steep part of its learning curve, so a gain any extra SFT would give is not the method's.
Every model is scored by the evaluate stage (greedy exact match on the run's benchmarks). The seed
varies the alignment stage only (sampling, pair order, replay); the SFT model is the same.

Prints, per variant, the mean and the spread (min–max) over seeds of: the targeted skills' mean
exact match and its change against SFT, the worst change on a non-targeted skill, the overall mean,
the final KL to the SFT model and the seconds. Results are kept in <store_root>/align-study.json, so
an interrupted study resumes; a run with `--set` overrides keeps its own file
(align-study-<overrides>.json) beside it, so variants never mix.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from flows.plan import plan  # noqa: E402
from posttrain.artifacts import Artifact, Store  # noqa: E402
from posttrain.config import EvaluateConfig, load_config  # noqa: E402
from posttrain.runner import execute_stage  # noqa: E402

NLL_OFF = {"dpo": {"sft_weight": 0.0, "replay_weight": 0.0}, "ppo": {"replay_weight": 0.0}, "grpo": {"replay_weight": 0.0}}


def build_upstream(cfg, store: Store, stages: tuple[str, ...] = ("base", "benchmarks", "data", "sft", "reward")) -> dict[str, Artifact]:
    """The named stages of the config's plan, through the runner (cached in `store`)."""
    artifacts = {}
    for step in plan(cfg):
        if step.name in stages:
            inputs = {name: artifacts[source] for name, source in step.inputs.items()}
            artifacts[step.name] = execute_stage(step.name, step.module, step.section, inputs, store, cfg.seed, None, cfg.runtime.threads).artifact
    return artifacts


def score(model_dir: Path, benchmarks: Artifact, out_dir: Path) -> dict[str, float]:
    from tasks import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    evaluate.run(EvaluateConfig(sample_items=0, loss_rows=0), {"model": Artifact(model_dir, {"digest": "study"}), "benchmarks": benchmarks}, out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    return {task: row["exact_match"] for task, row in results.items() if "exact_match" in row and task != "mean"}


def run_method(method: str, section, upstream: dict[str, Artifact], out_dir: Path) -> tuple[float, dict, dict]:
    import importlib

    module = importlib.import_module(f"tasks.align.{method}")
    inputs = {"sft": upstream["sft"], "data": upstream["data"]}
    if method == "ppo" or any(term.name == "reward_model" for term in getattr(section, "rewards", [])):
        inputs["reward"] = upstream["reward"]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    artifact = module.run(section, inputs, out_dir)
    return time.perf_counter() - started, artifact.metrics, artifact.manifest


def continued_sft(upstream: dict[str, Artifact], seconds: float, seed: int, replay_weight: float, out_dir: Path, lr: float = 1e-3, batch_rows: int = 32) -> dict:
    """The control: more SFT on the targeted prompts' correct answers (+ the same replay), for `seconds`."""
    from posttrain.formatting import ChatFormat
    from posttrain.jsonl import read_instruction_rows, read_jsonl
    from posttrain.models import load_causal_lm, load_tokenizer, save_pretrained
    from tasks.align.rollout import Replay, cosine_schedule

    data_dir, sft_dir = Path(upstream["data"].path), Path(upstream["sft"].path)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(sft_dir)
    chat = ChatFormat(tokenizer)
    model = load_causal_lm(sft_dir, dtype="float32").train()
    targeted = [{"prompt": row["prompt"], "response": row["answer"]} for row in read_jsonl(data_dir / "prompt" / "train.jsonl")]
    target = Replay(chat, targeted, batch_rows, 96, seed)
    replay = Replay(chat, read_instruction_rows(data_dir / "instruction" / "train.jsonl"), batch_rows, 96, seed + 1)

    def loss() -> torch.Tensor:
        value = target.nll(model)
        return value + replay_weight * replay.nll(model) if replay_weight > 0 else value

    # Steps that fit the budget, from the time of a few steps that change nothing (gradients discarded).
    clock = time.perf_counter()
    for _ in range(5):
        loss().backward()
        model.zero_grad()
    steps = max(10, int(seconds / ((time.perf_counter() - clock) / 5)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tokenizer, out_dir)
    return {"steps": steps, "seconds": round(time.perf_counter() - clock, 1)}


def summarise(rows: list[dict], sft: dict[str, float], targets: list[str]) -> dict:
    others = [task for task in sft if task not in targets]
    figures = []
    for row in rows:
        scores = row["scores"]
        targeted = sum(scores[t] for t in targets) / len(targets)
        figures.append(
            {
                "targeted": targeted,
                "targeted_gain": targeted - sum(sft[t] for t in targets) / len(targets),
                "worst_other": min(scores[t] - sft[t] for t in others) if others else math.nan,
                "overall": sum(scores.values()) / len(scores),
                "kl": row.get("final_kl", math.nan),
                "seconds": row["seconds"],
            }
        )
    return {key: [figure[key] for figure in figures] for key in figures[0]}


def spread(values: list[float], percent: bool = True) -> str:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return "—"
    scale = 100 if percent else 1
    mean = sum(finite) / len(finite) * scale
    if len(finite) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({min(finite) * scale:.1f}–{max(finite) * scale:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/align-study.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. align.ppo.critic_init=policy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / args.config, args.set)
    root = (REPO / cfg.store_root).resolve()  # relative to the repository, as the CLI run from it
    store = Store(root)
    upstream = build_upstream(cfg, store)
    variant_label = "".join(f"-{re.sub(r'[^A-Za-z0-9.=_]', '', item)}" for item in args.set)
    work = root / f"align-study{variant_label}"
    results_file = root / f"align-study{variant_label}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    sft_scores = results.get("sft") or score(Path(upstream["sft"].path), upstream["benchmarks"], work / "sft-eval")
    results["sft"] = sft_scores
    targets = cfg.align.target_skills or list(sft_scores)
    methods = args.methods or cfg.align.methods
    for seed in args.seeds:
        for method in methods:
            section = getattr(cfg.align, method).model_copy(update={"seed": seed})
            variants = {method: section, f"{method} (NLL off)": section.model_copy(update=NLL_OFF[method])}
            if method == "dpo" and section.pairs == "on_policy":  # on-policy pairs against the data's generated ones
                variants["dpo (generated pairs)"] = section.model_copy(update={"pairs": "data"})
            for label, variant in variants.items():
                key = f"{label} / seed {seed}"
                if key not in results:
                    folder = work / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}-seed{seed}"
                    seconds, metrics, _ = run_method(method, variant, upstream, folder)
                    results[key] = {"seconds": round(seconds, 1), "final_kl": metrics.get("final_kl"), "scores": score(folder, upstream["benchmarks"], folder / "eval")}
                    results_file.write_text(json.dumps(results, indent=1))
                print(f"{key}: {results[key]['seconds']} s", flush=True)
            control = f"control for {method} / seed {seed}"
            if control not in results:
                folder = work / f"control-{method}-seed{seed}"
                budget = results[f"{method} / seed {seed}"]["seconds"]
                info = continued_sft(upstream, budget, seed, getattr(section, "replay_weight", 0.0), folder)
                results[control] = {**info, "scores": score(folder, upstream["benchmarks"], folder / "eval")}
                results_file.write_text(json.dumps(results, indent=1))
            print(f"{control}: {results[control]['seconds']} s", flush=True)

    print(f"\nconfig {args.config} {' '.join(args.set)}, targeted {targets}, seeds {args.seeds}; SFT: " + ", ".join(f"{t} {100 * v:.0f}" for t, v in sft_scores.items()))
    header = f"{'variant':<22} {'targeted %':>20} {'Δ vs SFT':>20} {'worst other Δ':>20} {'overall %':>20} {'final KL':>18} {'seconds':>8}"
    print(header)
    for method in methods:
        for label in (method, f"{method} (NLL off)", *(["dpo (generated pairs)"] if method == "dpo" else []), f"control for {method}"):
            rows = [results[f"{label} / seed {seed}"] for seed in args.seeds if f"{label} / seed {seed}" in results]
            if not rows:
                continue
            s = summarise(rows, sft_scores, targets)
            print(
                f"{label:<22} {spread(s['targeted']):>20} {spread(s['targeted_gain']):>20} {spread(s['worst_other']):>20} "
                f"{spread(s['overall']):>20} {spread(s['kl'], percent=False):>18} {sum(s['seconds']) / len(rows):>8.0f}"
            )


if __name__ == "__main__":
    main()
