"""What a stage actually uses, observed while it runs — the oracle the cache-key property test
checks the key against. Nothing here reads posttrain.fingerprint or posttrain.closure.

    used = observe_stage("tasks.sft", section, inputs, out_dir)
    used.modules       # project modules imported while the stage was imported and ran
    used.files         # files opened (project data files, outside sources)
    used.libraries     # distributions the project code imported, with what they require

How: every project module is dropped from sys.modules first, so importing the stage and running
it executes each project module it needs afresh (third-party libraries stay loaded: only their
import statements in project code are recorded, through builtins.__import__). Files come from the
interpreter's `open` audit event. Afterwards the original modules are put back.
"""

from __future__ import annotations

import builtins
import importlib
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROJECT_PACKAGES = ("posttrain", "tasks", "flows", "data_contracts")


def is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT_PACKAGES


@dataclass
class Used:
    modules: set[str]
    files: set[str]
    libraries: set[str]


class _Opens:
    active: set[str] | None = None


def _audit(event: str, args) -> None:
    if event == "open" and _Opens.active is not None and isinstance(args[0], (str, Path)):
        _Opens.active.add(str(Path(args[0]).resolve()))


sys.addaudithook(_audit)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def libraries_of(top_level_names: set[str]) -> set[str]:
    """Distributions providing these import names, and (transitively) what they require on this
    platform, ignoring optional extras: read from the installed packages' metadata."""
    providers = metadata.packages_distributions()
    installed = {_normal(dist.metadata["Name"]) for dist in metadata.distributions() if dist.metadata["Name"]}
    pending = [_normal(dist) for name in top_level_names for dist in providers.get(name, [])]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name in found or name not in installed:
            continue
        found.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(_normal(requirement.name))
    return found


def _fresh(section, config_module):
    if isinstance(section, dict):
        return {key: _fresh(value, config_module) for key, value in section.items()}
    return getattr(config_module, type(section).__name__).model_validate(section.model_dump())


def observe_stage(module_name: str, section, inputs: dict, out_dir: Path) -> Used:
    saved = {name: module for name, module in sys.modules.items() if is_project(name)}
    for name in saved:
        del sys.modules[name]
    third_party: set[str] = set()
    opened: set[str] = set()
    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__", "") or ""
        if level == 0 and is_project(caller) and not is_project(name):
            third_party.add(name.split(".")[0])
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = recording_import
    _Opens.active = opened
    try:
        module = importlib.import_module(module_name)
        fresh_section = _fresh(section, sys.modules["posttrain.config"])
        artifact_class = sys.modules["posttrain.artifacts"].Artifact
        fresh_inputs = {name: artifact_class(artifact.path, artifact.manifest) for name, artifact in inputs.items()}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        module.run(fresh_section, fresh_inputs, Path(out_dir))
        modules = {name for name in sys.modules if is_project(name)}
    finally:
        builtins.__import__ = real_import
        _Opens.active = None
        for name in [name for name in sys.modules if is_project(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    stdlib = sys.stdlib_module_names
    return Used(modules, opened, libraries_of({name for name in third_party if name not in stdlib and name != "__future__"}))
