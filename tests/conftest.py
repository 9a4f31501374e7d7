"""Shared fixtures: a tiny base model, tiny clean data and benchmark folders, as Artifacts.

They are written directly (not through the stages) so each stage's unit test depends only on its
own module. Everything runs on the CPU with one thread, in a temporary folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from posttrain import skills
from posttrain.artifacts import Artifact
from posttrain.config import TinyModelConfig
from posttrain.jsonl import write_jsonl
from posttrain.models import build_tiny, save_pretrained

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("base")
    model, tokenizer = build_tiny(TinyModelConfig(), seed=0)
    save_pretrained(model, tokenizer, folder)
    return Artifact(folder, {"digest": "tiny-base", "metrics": {}})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("data")
    for role, rows in (("instruction", 600), ("preference", 300), ("prompt", 60)):
        records, _ = skills.generate_rows(role, rows=rows, seed=1)
        cut = len(records) // 10
        write_jsonl(folder / role / "eval.jsonl", records[:cut])
        write_jsonl(folder / role / "train.jsonl", records[cut:])
    return Artifact(folder, {"digest": "tiny-data", "metrics": {}})


@pytest.fixture(scope="session")
def tiny_benchmarks(tmp_path_factory) -> Artifact:
    """The six demo skill tasks, 5 scored + 3 calibration items each, as the benchmarks stage writes them."""
    import json

    from posttrain.benchmarks import load_task, task_items

    folder = tmp_path_factory.mktemp("benchmarks")
    specs = {}
    for name in ("copy", "reverse", "sort", "upper", "max", "add"):
        task = load_task(name)
        write_jsonl(folder / f"{name}.jsonl", task_items(task, calibration=3, items=5))
        specs[name] = task.model_dump(mode="json", exclude={"file"})
    (folder / "tasks.json").write_text(json.dumps(specs))
    return Artifact(folder, {"digest": "tiny-benchmarks", "metrics": {}})
