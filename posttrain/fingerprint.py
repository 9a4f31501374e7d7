"""The cache key of a stage: everything that could change its output, hashed.

    key = stage_key("sft", "tasks.sft", cfg.sft, {"base": base, "data": data}, memo=memo)
    key.fingerprint    # 20 hex characters: the store folder's name and Prefect's cache key
    key.parts          # what went in, recorded in the manifest (so a rebuild can be explained)

What enters (docs/reliability.md lists the cases and the test that checks them):
- the stage name and its config section, minus fields marked `NOT_IN_KEY` (the launcher, batch
  sizes of pure bookkeeping) — config.NOT_IN_KEY;
- the content digest of every input artifact (not its fingerprint: a rebuild that produces the
  same bytes leaves everything downstream cached);
- what the section reads from outside the store — data files and folders by their bytes, a hub
  model or dataset by its resolved commit (posttrain.outside);
- the stage's code: its module's import closure found from the source, the data files the closure
  declares, and the versions of Python and of every library the closure imports, with everything
  those libraries require (posttrain.closure).

The pipeline's top-level seed reaches a stage only through its section (flows/plan.py fills in
each section's `seed`), so a stage that has no seed — or its own, like data and benchmarks — is
not rebuilt when the top-level seed changes.
Not covered, on purpose: how a stage runs (runtime threads and device, the launcher, tracking),
and the flow that calls it. Nothing here imports a stage module, torch or a trainer, so every key
of a run can be computed in well under a second before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from posttrain import closure
from posttrain.artifacts import Artifact
from posttrain.config import Section
from posttrain.outside import DigestMemo, outside_digests


@dataclass(frozen=True)
class StageKey:
    fingerprint: str
    parts: dict


def section_payload(section) -> object:
    """The section as JSON values, without the fields marked NOT_IN_KEY."""
    if isinstance(section, BaseModel):
        fields = type(section).model_fields
        return {
            name: section_payload(getattr(section, name))
            for name in sorted(fields)
            if (fields[name].json_schema_extra or {}).get("cache_key", True)
        }
    if isinstance(section, dict):
        return {str(key): section_payload(value) for key, value in sorted(section.items())}
    if isinstance(section, (list, tuple)):
        return [section_payload(value) for value in section]
    return section


def module_source(module: str | ModuleType) -> tuple[str, Path | None]:
    """A stage given by name (the usual way: nothing gets imported) or as a module object."""
    if isinstance(module, str):
        return module, None
    path = Path(module.__file__).resolve()
    found = closure.module_file(module.__name__, closure.PROJECT_ROOT)
    return module.__name__, None if found is not None and found.resolve() == path else path


def parse_code_ahead(modules: list[str | ModuleType]) -> None:
    """Parse the stages' code here, before they are keyed on threads of their own: a library that
    parses source on a stage's thread (TorchScript does, at import) then never races a parse of
    ours (posttrain.closure.parse_source says why that matters)."""
    for module in modules:
        name, path = module_source(module)
        closure.stage_code(name, closure.PROJECT_ROOT, path)


def outside_of(section) -> dict:
    """The section's outside inputs; a dict of sections (benchmarks) contributes each entry's."""
    if isinstance(section, Section):
        return section.outside_inputs()
    if isinstance(section, dict):
        return {f"{name}.{key}": item for name, value in section.items() for key, item in outside_of(value).items()}
    return {}


def stage_key(
    stage: str,
    module: str | ModuleType,
    section,
    inputs: dict[str, Artifact],
    memo: DigestMemo | None = None,
) -> StageKey:
    name, path = module_source(module)
    code = closure.stage_code(name, closure.PROJECT_ROOT, path)
    parts = {
        "stage": stage,
        "config": section_payload(section),
        "inputs": {input_name: artifact.digest for input_name, artifact in sorted(inputs.items())},
        "outside": outside_digests(outside_of(section), memo or DigestMemo(None)),
        "code": {"modules": code.modules, "data_files": code.data_files},
        "versions": closure.environment_versions(code.distributions),
    }
    encoded = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return StageKey(hashlib.sha256(encoded).hexdigest()[:20], parts)


def fingerprint(stage: str, module: str | ModuleType, section, inputs: dict[str, Artifact], memo: DigestMemo | None = None) -> str:
    return stage_key(stage, module, section, inputs, memo).fingerprint
