"""Artifacts: a stage's output folder plus its manifest.json, published atomically into the store.

Layout under the store root:

    store/<stage>/<fingerprint>/   files …  manifest.json   (manifest written last)
    store/<stage>/.tmp-<fingerprint>-<pid>/                  (a stage in flight)

A folder counts only if its manifest exists. The manifest is written inside the temporary folder
and the folder is then renamed into place, so a crash at any point leaves either nothing or a
complete artifact — never a half-written one that looks finished. Paths in manifests are relative.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @classmethod
    def draft(cls, out_dir: Path, metrics: dict, **extra) -> "Artifact":
        """What a stage's run() returns: its folder, its metrics, and any extra manifest fields."""
        return cls(Path(out_dir), {"metrics": metrics, **extra})

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        path = Path(path)
        return cls(path, json.loads((path / MANIFEST).read_text()))


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def digest_dir(folder: Path) -> str:
    """Content digest of a folder: relative paths + file hashes, manifest excluded."""
    folder = Path(folder)
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST:
            continue
        sha.update(relative.encode() + b"\0" + _file_sha256(path).encode() + b"\n")
    return sha.hexdigest()


def write_json_atomic(path: Path, payload, sort_keys: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys, default=str))
    os.replace(temporary, path)


class Store:
    """The content-addressed store: store/<stage>/<fingerprint>/."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def final_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "store" / stage / fingerprint

    def lookup(self, stage: str, fingerprint: str) -> Artifact | None:
        folder = self.final_dir(stage, fingerprint)
        if (folder / MANIFEST).is_file():
            return Artifact.load(folder)
        return None

    def staging_dir(self, stage: str, fingerprint: str) -> Path:
        folder = self.root / "store" / stage / f".tmp-{fingerprint}-{os.getpid()}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def publish(self, stage: str, fingerprint: str, staged: Artifact, manifest_fields: dict) -> Artifact:
        """Write the manifest last, then rename the staged folder into place."""
        final = self.final_dir(stage, fingerprint)
        manifest = {
            **manifest_fields,
            **staged.manifest,
            "stage": stage,
            "fingerprint": fingerprint,
            "digest": digest_dir(staged.path),
            "path": final.relative_to(self.root).as_posix(),
        }
        write_json_atomic(staged.path / MANIFEST, manifest)
        if final.exists():
            # Same fingerprint but no manifest (a manual copy, a foreign tool): keep it aside, never delete.
            final.rename(final.with_name(f"{final.name}.orphan-{os.getpid()}"))
        os.replace(staged.path, final)
        return Artifact(final, manifest)
