"""Artifacts: a stage's output folder plus its manifest.json, published atomically into the store.

Layout under the store root:

    store/<stage>/<fingerprint>/   files …  manifest.json   (manifest written last)
    store/<stage>/.tmp-<fingerprint>-<pid>/                  (a stage in flight)

A folder counts only if its manifest exists. The manifest is written inside the temporary folder
and the folder is then renamed into place, so a crash at any point leaves either nothing or a
complete artifact — never a half-written one that looks finished. Paths in manifests are relative
to the store root, so a store can be copied or moved.

The manifest lists every file with its size, mtime and sha256. A lookup checks that the folder
still holds exactly those files at those sizes (re-hashing only a file whose mtime moved, as a
copy without `-a` does): an artifact edited after publishing is refused, never silently reused.
`verify()` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
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


class TamperedArtifact(RuntimeError):
    """A published artifact whose files no longer match its manifest, said in one line."""


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _content_files(folder: Path) -> dict[str, Path]:
    files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
    files.pop(MANIFEST, None)
    return dict(sorted(files.items()))


def _digest_of(shas: dict[str, str]) -> str:
    sha = hashlib.sha256()
    for relative, file_sha in sorted(shas.items()):
        sha.update(relative.encode() + b"\0" + file_sha.encode() + b"\n")
    return sha.hexdigest()


def digest_dir(folder: Path) -> str:
    """Content digest of a folder: relative paths + file hashes, manifest excluded."""
    return _digest_of({relative: file_sha256(path) for relative, path in _content_files(Path(folder)).items()})


def file_records(folder: Path) -> dict[str, list]:
    """{relative path: [size, mtime_ns, sha256]} of every file but the manifest."""
    records = {}
    for relative, path in _content_files(Path(folder)).items():
        stat = path.stat()
        records[relative] = [stat.st_size, stat.st_mtime_ns, file_sha256(path)]
    return records


def check_files(artifact: "Artifact", rehash: bool = False) -> None:
    """Raise TamperedArtifact unless the folder holds exactly the manifest's files, unchanged.

    Cheap by default: sizes always, content only where the mtime differs from the recorded one;
    `rehash=True` hashes every file (posttrain verify)."""
    recorded: dict[str, list] | None = artifact.manifest.get("files")
    where = artifact.manifest.get("path", str(artifact.path))
    present = _content_files(artifact.path)
    if recorded is None:  # a manifest from before files were recorded: the digest is all there is
        if digest_dir(artifact.path) != artifact.manifest.get("digest"):
            raise TamperedArtifact(f"{where}: content no longer matches its manifest digest; remove the folder to rebuild it")
        return
    problem = None
    missing = sorted(set(recorded) - set(present))
    extra = sorted(set(present) - set(recorded))
    if missing:
        problem = f"{missing[0]} is missing"
    elif extra:
        problem = f"{extra[0]} was added"
    else:
        for relative, (size, mtime_ns, sha) in recorded.items():
            stat = present[relative].stat()
            if stat.st_size != size:
                problem = f"{relative} changed size ({stat.st_size:,} bytes, published with {size:,})"
            elif (rehash or stat.st_mtime_ns != mtime_ns) and file_sha256(present[relative]) != sha:
                problem = f"{relative} changed content (sha256 differs from the manifest)"
            if problem:
                break
    if problem:
        raise TamperedArtifact(
            f"{where}: {problem} after it was published; a tampered artifact is never reused — remove the folder to rebuild it"
        )


def write_json_atomic(path: Path, payload, sort_keys: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # per writer: stages log at once
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys, default=str))
    os.replace(temporary, path)


class Store:
    """The content-addressed store: store/<stage>/<fingerprint>/."""

    def __init__(self, root: Path, remote=None):
        """`remote`: a posttrain.remote.RemoteStore shared with other machines (config `shared_store`)."""
        self.root = Path(root)
        self.remote = remote
        self.digest_memo_path = self.root / "cache" / "outside-digests.json"

    def final_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "store" / stage / fingerprint

    def lookup(self, stage: str, fingerprint: str) -> Artifact | None:
        """The published artifact for this fingerprint, checked against its manifest; None if absent."""
        folder = self.final_dir(stage, fingerprint)
        if not (folder / MANIFEST).is_file():
            return self._pull(stage, fingerprint) if self.remote is not None else None
        artifact = Artifact.load(folder)
        check_files(artifact)
        if self.remote is not None and not self.remote.has(artifact.manifest["path"]):
            self.remote.upload(artifact)  # published here before the store was shared
        return artifact

    def _pull(self, stage: str, fingerprint: str) -> Artifact | None:
        """Published on the shared store by another machine: download, check, move into place."""
        relative = self.final_dir(stage, fingerprint).relative_to(self.root).as_posix()
        if not self.remote.has(relative):
            return None
        staging = self.root / "store" / stage / f".tmp-{fingerprint}-pull{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.remote.download(relative, staging)
            final = self.final_dir(stage, fingerprint)
            if not (final / MANIFEST).is_file():
                os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Artifact.load(self.final_dir(stage, fingerprint))

    def artifacts(self, stage: str | None = None) -> list[Artifact]:
        """Every published artifact (of one stage), without checking them."""
        pattern = f"{stage or '*'}/*/{MANIFEST}"
        return [Artifact.load(path.parent) for path in sorted((self.root / "store").glob(pattern))]

    @contextmanager
    def build_lock(self, stage: str, fingerprint: str, wait: bool = True):
        """Held while one process builds `stage` at `fingerprint`: a second run of the same work on
        this store waits here, then finds the artifact published. An flock, so the kernel releases
        it when its holder dies, however it dies. Yields whether it holds the lock: with `wait`
        False (`posttrain gc`), False at once when someone is building."""
        import fcntl

        folder = self.root / "locks" / stage  # beside store/, which holds only artifacts and staging folders
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{fingerprint}.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def checkpoint_dir(self, stage: str, fingerprint: str) -> Path:
        """Where a training stage keeps its checkpoints while it builds `fingerprint` (outside
        `store/`: never an artifact, and removed once the stage is published)."""
        return self.root / "checkpoints" / stage / fingerprint

    def staging_dir(self, stage: str, fingerprint: str) -> Path:
        """A fresh staging folder. Called under build_lock, so any other staging folder of this
        fingerprint is a dead or failed attempt's: removed now (its diagnostics were for that one)."""
        parent = self.root / "store" / stage
        for stale in parent.glob(f".tmp-{fingerprint}-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)  # the subprocess launcher's .config.json / .inputs.json
        folder = parent / f".tmp-{fingerprint}-{os.getpid()}"
        folder.mkdir(parents=True)
        return folder

    def publish(self, stage: str, fingerprint: str, staged: Artifact, manifest_fields: dict, replace: bool = False) -> Artifact:
        """Write the manifest last, then rename the staged folder into place. `replace` (a forced
        rebuild, `posttrain rerun --from`): a published folder of the same fingerprint with other
        bytes is moved to `<root>/replaced/<stage>/` (out of the store; `posttrain gc` removes it) and the new build
        takes its place; with the same bytes, the published folder stays and the new one is dropped."""
        final = self.final_dir(stage, fingerprint)
        files = file_records(staged.path)
        manifest = {
            **manifest_fields,
            **staged.manifest,
            "stage": stage,
            "fingerprint": fingerprint,
            "digest": _digest_of({relative: record[2] for relative, record in files.items()}),
            "path": final.relative_to(self.root).as_posix(),
            "files": files,
        }
        if replace and (final / MANIFEST).is_file() and Artifact.load(final).digest != manifest["digest"]:
            aside = self.root / "replaced" / stage / f"{fingerprint}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            final.rename(aside)
        if (final / MANIFEST).is_file():
            # Published meanwhile by a process that did not share our lock (another host on a
            # shared folder): a finished folder is never moved; ours is the same work, dropped.
            shutil.rmtree(staged.path, ignore_errors=True)
            published = Artifact.load(final)
            if self.remote is not None:
                self.remote.upload(published)
            return published
        write_json_atomic(staged.path / MANIFEST, manifest)
        if final.exists():
            # Same fingerprint but no manifest (a manual copy, a foreign tool): keep it aside, never delete.
            final.rename(final.with_name(f"{final.name}.orphan-{os.getpid()}"))
        os.replace(staged.path, final)
        artifact = Artifact(final, manifest)
        if self.remote is not None:  # shared with other machines: files first, manifest last
            self.remote.upload(artifact)
        return artifact
