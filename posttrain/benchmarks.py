"""Benchmark tasks as data: one YAML file per task (configs/benchmarks/*.yaml), in the spirit of
lm-evaluation-harness tasks, plus the two small registries a task names — item generators and
answer extractors — which users extend.

    task = load_task("gsm8k")                      # configs/benchmarks/gsm8k.yaml, or a path
    items = task_items(task, calibration=50)       # [{"id", "task", "split", "prompt", "answer", ...}]
    extract_answer(task, "... so 18 eggs. #### 18")   # "18"

A task file says where items come from (`source`: a generator, or a file with its fields), how an
item becomes the user message (`message`, a format string over the item's fields — the model's
chat template wraps it), how an answer is read from a reply (`extract`: a named extractor, or
`{regex: ...}` whose first group is the answer), which metrics it reports, how many items it
scores, and a `version`. The file's bytes enter the benchmarks stage's cache key (it is an input
from outside the store), so editing a task re-builds exactly what reads it.

Items come in two splits: `score` (the first `items` of the task) and `calibration` (the next
ones, disjoint from them, on which evaluate fits its temperature for calibration). Generated
items are drawn from a stream seeded per task; file items are ordered by a salted hash of their
text, so the sample is fixed and does not depend on the file's row order.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from posttrain import skills
from posttrain.config import BENCHMARK_TASKS_DIR, ConfigError, Section, benchmark_task_file
from posttrain.transcripts import PromptMismatch, hh_turns, transcript_text


class TaskSource(Section):
    """`generator: skills` (+ skill, seed) or `path:` a JSON-lines file (optionally .gz)."""

    generator: Literal["skills"] | None = None
    skill: str | None = None
    seed: int = 0
    path: str | None = None
    format: Literal["fields", "hh"] = Field("fields", description="hh: hh-rlhf chosen/rejected transcripts")
    fields: dict[str, str] = Field(default_factory=dict, description="item field -> column in the file")
    answer: str | None = Field(None, description="extractor applied to the reference answer (gsm8k: the number after ####)")


class BenchmarkTask(Section):
    name: str
    version: int = 1
    kind: Literal["generation", "preference"] = "generation"
    source: TaskSource
    items: int = Field(100, ge=1)
    message: str = "{prompt}"
    extract: str | dict[str, str] = "first_line"
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"])
    tags: list[str] = Field(default_factory=list)
    file: str | None = Field(None, description="the YAML this task was read from (filled on load)")


# ----------------------------------------------------------------------------- answer extractors

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> str:
    """A number as written, normalised: no thousands commas, no trailing ".0"."""
    value = text.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def first_line(reply: str) -> str:
    return reply.strip().split("\n", 1)[0].strip()


def last_number(reply: str) -> str:
    found = _NUMBER.findall(reply)
    return _number(found[-1]) if found else ""


def gsm8k(reply: str) -> str:
    """The number after the last "####", else the last number in the reply."""
    marked = re.findall(r"####\s*(" + _NUMBER.pattern + ")", reply)
    return _number(marked[-1]) if marked else last_number(reply)


EXTRACTORS = {"first_line": first_line, "last_number": last_number, "gsm8k": gsm8k}


def extract_answer(task: BenchmarkTask, reply: str) -> str:
    if isinstance(task.extract, dict):
        match = re.search(task.extract["regex"], reply)
        return (match.group(1) if match.groups() else match.group(0)).strip() if match else ""
    return EXTRACTORS[task.extract](reply)


# ----------------------------------------------------------------------------- loading tasks


def load_task(name_or_path: str) -> BenchmarkTask:
    path = benchmark_task_file(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BENCHMARK_TASKS_DIR.glob("*.yaml")))
        raise ConfigError(f"benchmarks.tasks: {name_or_path!r}: no task file {path} (shipped: {known})")
    try:
        task = BenchmarkTask.model_validate({**(yaml.safe_load(path.read_text()) or {}), "file": str(path)})
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(part) for part in first["loc"]) if first else "YAML"
        raise ConfigError(f"{path}: {where}: {first['msg'] if first else 'invalid YAML'}") from None
    if task.name != path.stem:
        raise ConfigError(f"{path}: name: {task.name!r} must be the file's name ({path.stem!r}), which configs refer to")
    if isinstance(task.extract, str) and task.extract not in EXTRACTORS:
        raise ConfigError(f"{path}: extract: {task.extract!r} is not an extractor ({', '.join(EXTRACTORS)}, or {{regex: ...}})")
    if task.source.generator is None and task.source.path is None:
        raise ConfigError(f"{path}: source: give `generator` or `path`")
    if task.source.generator == "skills" and task.source.skill not in skills.SKILLS:
        raise ConfigError(f"{path}: source.skill: {task.source.skill!r} is not a skill ({', '.join(skills.SKILLS)})")
    return task


def _salted(text: str, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}\x1f{text}".encode()).digest()


def _read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _generated(task: BenchmarkTask, count: int) -> list[dict]:
    rng = random.Random(f"{task.source.seed}-{task.source.skill}")
    seen, rows = set(), []
    for _ in range(count * 50):
        if len(rows) == count:
            break
        prompt, answer = skills.sample(task.source.skill, rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": answer, "skill": task.source.skill})
    return rows


def _from_file(task: BenchmarkTask, count: int) -> list[dict]:
    path = Path(task.source.path)
    if not path.is_file():
        raise ValueError(f"{task.file}: source.path {path}: no such file")
    rows = []
    for number, raw in enumerate(_read_rows(path), start=1):
        if task.source.format == "hh":
            try:
                turns, chosen, rejected = hh_turns(raw["chosen"], raw["rejected"])
            except PromptMismatch:
                continue
            if chosen == rejected or not turns:
                continue
            row = {"prompt": transcript_text(turns), "chosen": chosen, "rejected": rejected}
            if len(turns) > 1:
                row["messages"] = [{"role": role, "content": content.strip()} for role, content in turns]
        else:
            row = {}
            for field, column in (task.source.fields or {"prompt": "prompt", "answer": "answer"}).items():
                if column not in raw:
                    raise ValueError(f"{path} row {number}: missing key {column!r} (task {task.name}, field {field})")
                row[field] = raw[column]
        rows.append(row)
    # A fixed sample whatever the file's row order: by a salted hash of the row's text.
    rows.sort(key=lambda row: _salted(json.dumps(row, sort_keys=True), f"{task.name}-v{task.version}"))
    return rows[:count]


def task_items(task: BenchmarkTask, calibration: int = 0, items: int | None = None) -> list[dict]:
    """The task's items: `items` (default: the task's) scored, then `calibration` more."""
    scored = items or task.items
    rows = _generated(task, scored + calibration) if task.source.generator else _from_file(task, scored + calibration)
    out = []
    for index, row in enumerate(rows):
        item = {"id": f"{task.name}-{index}", "task": task.name, "split": "score" if index < scored else "calibration"}
        if task.kind == "preference":
            item.update(row)
        else:
            reference = row.get("answer", "")
            if task.source.answer:
                reference = EXTRACTORS[task.source.answer](str(reference))
            item.update(prompt=task.message.format(**row), answer=str(reference).strip(), **({"skill": row["skill"]} if "skill" in row else {}))
        out.append(item)
    return out


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()
