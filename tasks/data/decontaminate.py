"""Step 6: drop training rows that overlap the run's own benchmarks, counted per benchmark."""

from __future__ import annotations

from pathlib import Path

from tasks.data.clean import normalize_text
from tasks.data.ingest import read_source_file
from tasks.data.records import Removals, Row


def load_benchmark_prompts(folder: Path) -> dict[str, set[str]]:
    """{benchmark name: normalised prompts} from <folder>/<name>.jsonl."""
    prompts = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        numbered = read_source_file(str(path), "jsonl")
        for row_number, item in numbered:
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"{path} row {row_number}: benchmark items need a string 'prompt'")
        prompts[path.stem] = {normalize_text(item["prompt"]) for _, item in numbered}
    if not prompts:
        raise ValueError(f"{folder}: no <benchmark>.jsonl files to decontaminate against")
    return prompts


def decontaminate(rows: list[Row], benchmarks: dict[str, set[str]], removals: Removals) -> tuple[list[Row], dict]:
    per_benchmark = {name: 0 for name in benchmarks}
    kept = []
    for row in rows:
        hits = [name for name, prompts in benchmarks.items() if row.record["prompt"] in prompts]
        for name in hits:
            per_benchmark[name] += 1
        if hits:
            removals.add("decontaminated", row, benchmarks=hits)
        else:
            kept.append(row)
    return kept, per_benchmark
