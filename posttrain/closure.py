"""A stage's code, found from the source: its import closure, the data files it declares, and the
libraries it pulls in — what the cache key hashes instead of a hand-kept list of modules.

    code = stage_code("tasks.sft")
    code.modules        # {"tasks": digest, "tasks.sft": digest, "posttrain.formatting": digest, ...}
    code.data_files     # {"data_contracts/sft_tokenized.json": sha256}
    code.distributions  # ["accelerate", "datasets", "numpy", "torch", "transformers", "trl", ...]

Nothing is imported: each module's file is parsed (`ast`), and every `import` statement anywhere
in it — lazy imports inside functions included — adds the project modules it names (and their
parent packages, which Python runs first). The `if __name__ == "__main__":` block is skipped: it
is how a stage is launched as its own process, not what it computes. A module's digest is the hash
of its syntax tree without docstrings, so an edit to a comment, a docstring or the layout does not
rebuild anything, and any edit to the code does.

A stage declares the project files it reads as data in a module-level `DATA_FILES` tuple of paths
relative to the project root (its contract suites, benchmark definitions); their bytes are hashed.

Libraries: the third-party top-level modules the closure imports, mapped to their distributions,
plus everything those distributions require (installed ones, extras excluded): a numpy under
transformers or a pyarrow under datasets can change results as much as the library itself.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from posttrain.artifacts import file_sha256

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_FILES_NAME = "DATA_FILES"


@dataclass(frozen=True)
class ParsedModule:
    digest: str  # of the syntax tree without docstrings and without the __main__ block
    project_imports: frozenset[str]  # dotted names, not yet checked against files
    third_party: frozenset[str]  # top-level import names that are neither project nor stdlib
    data_files: tuple[str, ...]  # the module's DATA_FILES declaration, paths relative to the root


@dataclass
class StageCode:
    modules: dict[str, str] = field(default_factory=dict)  # module name -> ParsedModule.digest
    data_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of the bytes
    third_party: set[str] = field(default_factory=set)

    @property
    def distributions(self) -> list[str]:
        return distributions_for(frozenset(self.third_party))


def cached_once(function):
    """functools.cache that computes each value once even when threads ask at the same time (stages
    in flight together all want the installed distributions first; unlocked, each would scan)."""
    cached = functools.cache(function)
    lock = threading.Lock()

    @functools.wraps(function)
    def wrapper(*args):
        with lock:
            return cached(*args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


def project_packages(root: Path) -> frozenset[str]:
    """Top-level folders of the project that are Python packages (posttrain, tasks, flows, ...)."""
    return frozenset(path.parent.name for path in root.glob("*/__init__.py"))


def module_file(name: str, root: Path) -> Path | None:
    """The source file of a project module, found by path (importing it could cost seconds)."""
    relative = Path(*name.split("."))
    for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_main_guard(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def _declared_data_files(tree: ast.Module, path: Path) -> tuple[str, ...]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == DATA_FILES_NAME for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{path}: {DATA_FILES_NAME} must be a literal tuple of paths relative to the project root") from None
            return tuple(sorted(value))
    return ()


def _package_of(module_name: str, path: Path) -> str:
    return module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]


# CPython keeps the recursion depth of ast.parse's tree building in interpreter-wide state. Two
# threads parsing at once (stages in flight together each key their code) can interleave there and
# fail with "SystemError: AST constructor recursion depth mismatch" (seen in CI on 3.11.7;
# tests/posttrain/test_closure_threads.py reproduces it). Parsing takes milliseconds: one at a time.
_PARSE_LOCK = threading.Lock()


def parse_source(source: str, filename: str) -> ast.Module:
    with _PARSE_LOCK:
        return ast.parse(source, filename=filename)


@functools.lru_cache(maxsize=4096)
def _parse(path: Path, module_name: str, packages: frozenset[str], stat_key: tuple) -> ParsedModule:
    source = path.read_text(encoding="utf-8")
    tree = parse_source(source, str(path))
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    data_files = _declared_data_files(tree, path)
    project, third_party = set(), set()
    package = _package_of(module_name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [(target, tuple(alias.name for alias in node.names))]
        else:
            continue
        for dotted, members in names:
            top = dotted.split(".")[0]
            if top in packages:
                project.add(dotted)
                project.update(f"{dotted}.{member}" for member in members if member != "*")
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    _strip_docstrings(tree)
    digest = hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()
    return ParsedModule(digest, frozenset(project), frozenset(third_party), data_files)


def parse_module(name: str, root: Path = PROJECT_ROOT, path: Path | None = None, packages: frozenset[str] | None = None) -> ParsedModule:
    """`packages`: project_packages(root), when the caller already has it (one glob per closure, not per module)."""
    path = path or module_file(name, root)
    if path is None:
        raise ValueError(f"{name}: no such project module under {root}")
    stat = path.stat()
    return _parse(path, name, packages if packages is not None else project_packages(root), (stat.st_mtime_ns, stat.st_size, stat.st_ino))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def stage_code(module_name: str, root: Path = PROJECT_ROOT, path: Path | None = None) -> StageCode:
    """The import closure of `module_name` (with parent packages), its declared data files and the
    third-party modules it imports. `path` names the source file of a module outside the project
    layout (a test's stand-in stage)."""
    code = StageCode()
    packages = project_packages(root)
    pending = [(module_name, path)] + [(parent, None) for parent in _with_parents(module_name)[:-1]]
    while pending:
        name, explicit = pending.pop()
        if name in code.modules:
            continue
        file = explicit or module_file(name, root)
        if file is None:
            continue  # `from package import function`: the name is not a module
        parsed = parse_module(name, root, file, packages)
        code.modules[name] = parsed.digest
        code.third_party |= parsed.third_party
        for relative in parsed.data_files:
            data_path = root / relative
            if not data_path.is_file():
                raise ValueError(f"{file}: {DATA_FILES_NAME} names {relative}, which does not exist")
            code.data_files[relative] = file_sha256(data_path)
        for imported in parsed.project_imports:
            pending.extend((parent, None) for parent in _with_parents(imported) if parent not in code.modules)
    code.modules = dict(sorted(code.modules.items()))
    code.data_files = dict(sorted(code.data_files.items()))
    return code


# ----------------------------------------------------------------------------- libraries


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cached_once
def installed_versions() -> dict[str, str]:
    """Every installed distribution's version, by normalised name (one scan of site-packages)."""
    return {_normal(dist.metadata["Name"]): dist.version for dist in metadata.distributions() if dist.metadata["Name"]}


@cached_once
def _top_level_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cached_once
def _requirements(distribution: str) -> tuple[str, ...]:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        declared = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return ()
    names = []
    for text in declared:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's dependency
        names.append(_normal(requirement.name))
    return tuple(names)


@cached_once
def distributions_for(top_level_names: frozenset[str]) -> list[str]:
    """The installed distributions that provide these import names, and everything they require."""
    installed = installed_versions()
    pending = [_normal(dist) for name in top_level_names for dist in _top_level_distributions().get(name, [])]
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name in found or name not in installed:
            continue
        found.add(name)
        pending.extend(_requirements(name))
    return sorted(found)


def python_version() -> str:
    return f"{sys.implementation.name}-{'.'.join(map(str, sys.version_info[:3]))}"


def environment_versions(distributions: list[str]) -> dict[str, str]:
    """Python and the given distributions' versions (the test of the key fakes installed_versions)."""
    installed = installed_versions()
    return {"python": python_version(), **{name: installed.get(name, "absent") for name in distributions}}


