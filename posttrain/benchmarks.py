"""Benchmark tasks: each kind turns its config section into held-out items with exact answers.

This is one of the few registries in posttrain, because users add benchmarks. An item is
`{"id", "skill", "prompt", "answer"}`; a model's output is scored by exact match after stripping.
Both the data stage (decontamination) and the evaluate stage read benchmarks through here, so the
two can never disagree about what is held out.
"""

from __future__ import annotations

from posttrain import skills
from posttrain.config import BenchmarkConfig


def _skills(config: BenchmarkConfig) -> list[dict]:
    return skills.benchmark_items(config.per_skill, config.seed, config.skills)


BENCHMARKS = {"skills": _skills}


def load_items(config: BenchmarkConfig) -> list[dict]:
    return BENCHMARKS[config.kind](config)


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()
