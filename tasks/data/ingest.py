"""Step 1: read each source (JSON lines, JSON array, or generated skills) into Rows, checking fields."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import skills
from posttrain.config import SourceConfig
from posttrain.jsonl import write_jsonl
from tasks.data.records import ROLE_FIELDS, Row


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def check_record(record, role: str, source: str, row_number: int) -> dict:
    """The role's fields (+ skill) of one source record, or a one-line ValueError naming file/row/key."""
    where = f"{source} row {row_number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_type_name(record)} (role {role})")
    kept = {}
    for key in ROLE_FIELDS[role]:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (role {role})")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {_type_name(record[key])} (role {role})")
        kept[key] = record[key]
    if "skill" in record:
        if not isinstance(record["skill"], str):
            raise ValueError(f"{where}: key 'skill' must be a string, got {_type_name(record['skill'])} (role {role})")
        kept["skill"] = record["skill"]
    return kept


def read_source_file(path: str, fmt: str) -> list[tuple[int, object]]:
    """(row number, record) pairs: line numbers for JSON lines, 1-based positions for a JSON array."""
    file = Path(path)  # relative paths are relative to the working directory, like any CLI path
    if not file.is_file():
        raise ValueError(f"{path}: source file not found (cwd {Path.cwd()})")
    text = file.read_text(encoding="utf-8")
    if fmt == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records, got {_type_name(records)}")
        return list(enumerate(records, start=1))
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} row {line_number}: invalid JSON ({exc.msg})") from None
    return rows


def ingest(sources: list[SourceConfig], out_dir: Path) -> tuple[list[Row], dict, list[dict]]:
    """All source rows in order, the planted-noise totals of generated sources, and a per-source tally."""
    rows: list[Row] = []
    planted = {"exact_duplicates": 0, "near_duplicates": 0, "empty": 0, "overlong": 0}
    tally = []
    for index, source in enumerate(sources):
        if source.format == "generated":
            spec = source.generate
            noise_fractions = {key: getattr(spec, key) for key in planted}
            records, noise = skills.generate_rows(source.role, rows=spec.rows, seed=spec.seed, skills=spec.skills, **noise_fractions)
            name = f"raw/{index}-{source.role}.jsonl"
            write_jsonl(out_dir / name, records)
            numbered = list(enumerate(records, start=1))
            for key in planted:
                planted[key] += getattr(noise, key)
        else:
            name = source.path
            numbered = read_source_file(source.path, source.format)
        for row_number, record in numbered:
            kept = check_record(record, source.role, name, row_number)
            rows.append(Row(source.role, kept, record, name, row_number))
        tally.append({"source": name, "role": source.role, "rows": len(numbered)})
    return rows, planted, tally
