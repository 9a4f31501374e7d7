"""The cache key of a stage: everything that could change its output, hashed.

    fingerprint("sft", tasks.sft, sft_section, {"base": base_artifact, "data": data_artifact}, seed=0)

Covers the stage name, its resolved config section, the content digests of its input artifacts,
the source of its `tasks/` module and of the shared modules that shape every output (prompt
template, model building, skills), the seed, and the versions of the libraries that change
results. Not covered, on purpose: runtime settings (threads, device choice, launcher) and the
Prefect wrapper — they change how a stage runs, not what it produces.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from posttrain.artifacts import Artifact

# Shared modules whose code shapes the output of every stage that uses them.
_SHARED_MODULES = ("formatting.py", "models.py", "skills.py", "benchmarks.py", "training.py", "scoring.py")
_RESULT_LIBRARIES = (
    "torch", "transformers", "trl", "peft", "accelerate", "tokenizers", "datasets",
    "bitsandbytes", "datasketch", "great_expectations",
)
_EXCLUDED_KEYS = {"launcher"}  # how a stage is launched does not change what it produces


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _RESULT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def library_versions() -> dict[str, str]:
    return dict(_VERSIONS)


_VERSIONS = _library_versions()


def source_digest(module: ModuleType, extra_files: tuple[Path, ...] = ()) -> str:
    """Hash of the stage's module file (or package folder) plus the shared modules and extra files."""
    module_path = Path(module.__file__)
    files = sorted(module_path.parent.rglob("*.py")) if module_path.name == "__init__.py" else [module_path]
    shared_root = Path(__file__).parent
    files += [shared_root / name for name in _SHARED_MODULES]
    files += sorted(extra_files)
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode() + b"\0" + path.read_bytes() + b"\n")
    return sha.hexdigest()


def section_payload(section) -> object:
    if isinstance(section, BaseModel):
        section = section.model_dump(mode="json")
    if isinstance(section, dict):
        return {
            key: section_payload(value) for key, value in sorted(section.items()) if key not in _EXCLUDED_KEYS
        }
    if isinstance(section, list):
        return [section_payload(value) for value in section]
    return section


def fingerprint(
    stage: str,
    module: ModuleType,
    section,
    inputs: dict[str, Artifact],
    seed: int,
    extra_files: tuple[Path, ...] = (),
) -> str:
    payload = {
        "stage": stage,
        "config": section_payload(section),
        "inputs": {name: artifact.digest for name, artifact in sorted(inputs.items())},
        "source": source_digest(module, extra_files),
        "seed": seed,
        "versions": _VERSIONS,
    }
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:20]
