"""Inputs from outside the store — data source files, a local model folder, a hub id — as digests.

    memo = DigestMemo(store_root / "cache" / "outside-digests.json")
    outside_digest(OutsideInput("path", "../shared/realdata/gsm8k/train.jsonl"), memo)   # "sha256:…"
    outside_digest(OutsideInput("hub_model", "Qwen/Qwen2.5-0.5B", "main"), memo)         # "commit:…"

A local file or folder enters a cache key by the sha256 of its bytes (a folder: of each file's
relative path and sha256), read in 1 MiB blocks. Hashing costs about a second per GB
(docs/benchmarks.md), so a file's digest is remembered with its size, mtime, ctime and inode and
reused while all four are unchanged: the ctime cannot be set back by `touch`, so an edited file
is always hashed again. The memo lives under the store root and is keyed by a hash of the
absolute path, so the store holds no path outside itself.

A hub id enters by its commit: `revision` when it is already a 40-hex commit, otherwise resolved
— through the hub when online, else from the local Hugging Face cache's refs — and an id that can
be resolved neither way is an error that says to pin the revision. The base stage loads the same
commit it resolves, so the key and the weights agree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from posttrain.artifacts import file_sha256
from posttrain.config import OutsideInput

COMMIT = re.compile(r"^[0-9a-f]{40}$")


class OutsideInputError(ValueError):
    """An outside input that cannot be digested or resolved, in one line."""


class DigestMemo:
    """sha256 of outside files, remembered by (size, mtime, ctime, inode); saved as one JSON file."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a damaged memo only costs a re-hash

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        remembered = self.entries.get(key)
        if remembered and remembered[:4] == signature:
            return remembered[4]
        digest = file_sha256(path)
        self.entries[key] = [*signature, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.entries, sort_keys=True))
        os.replace(temporary, self.path)
        self.changed = False


def path_digest(path: Path, memo: DigestMemo) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list; hidden files included."""
    if path.is_file():
        return memo.file_digest(path)
    sha = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        sha.update(file.relative_to(path).as_posix().encode() + b"\0" + memo.file_digest(file).encode() + b"\n")
    return sha.hexdigest()


def _cached_ref(kind: str, repo: str, revision: str) -> str | None:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit if COMMIT.match(commit) else None
    return None


@functools.cache
def resolve_hub_revision(kind: str, repo: str, revision: str | None) -> str:
    """The commit sha of `repo` at `revision` (kind: "model" or "dataset"); memoised per process,
    so the key and the stage that loads the weights see the same commit."""
    revision = revision or "main"
    if COMMIT.match(revision):
        return revision
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            info = api.model_info(repo, revision=revision) if kind == "model" else api.dataset_info(repo, revision=revision)
            if info.sha:
                return info.sha
        except Exception:  # no network, no such repo, rate limit: try the local cache, then say so
            pass
    commit = _cached_ref(kind, repo, revision)
    if commit:
        return commit
    raise OutsideInputError(
        f"{kind} {repo!r}: cannot resolve revision {revision!r} to a commit "
        f"({'offline' if offline else 'hub unreachable'} and not in the local Hugging Face cache); pin it to a 40-hex commit"
    )


def outside_digest(name: str, item: OutsideInput, memo: DigestMemo) -> str:
    """`name` (e.g. "data.sources[0]") only labels errors."""
    if item.kind == "path":
        path = Path(item.name).expanduser()
        if not path.exists():
            raise OutsideInputError(f"{name}: {item.name}: no such file or folder")
        return f"sha256:{path_digest(path, memo)}"
    kind = "model" if item.kind == "hub_model" else "dataset"
    return f"commit:{resolve_hub_revision(kind, item.name, item.revision)}"


def outside_digests(items: dict[str, OutsideInput], memo: DigestMemo) -> dict[str, str]:
    digests = {name: outside_digest(name, item, memo) for name, item in sorted(items.items())}
    memo.save()
    return digests
