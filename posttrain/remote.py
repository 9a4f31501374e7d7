"""A shared store in an object store: published artifacts mirrored under an fsspec URL.

    remote = RemoteStore("s3://team-bucket/posttrain", {"endpoint_url": "http://127.0.0.1:9000"})
    remote.upload(artifact)                      # files first, manifest.json last
    remote.download("store/sft/<fp>", staging)   # manifest first, then every file, each re-hashed

Machines that share `shared_store` share their work: a stage published by one (a GPU worker, a
colleague's run) is a cache hit for the others, which download it into their local store. The
local store stays the working copy (stages read local folders; records, logs, locks and Prefect's
and MLflow's files stay local), and the remote is keyed exactly like it: `store/<stage>/<fp>/`.

A remote folder counts only once its manifest.json exists, and the manifest is uploaded last, so a
half-uploaded folder (a killed upload, a full bucket) is never taken for a published one. A
download is checked file by file against the manifest's sha256 before it is moved into the local
store: a remote object edited after publishing is refused, never used. Credentials come from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the machine's role), never the config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from posttrain.artifacts import MANIFEST, Artifact, TamperedArtifact, check_files


class RemoteStoreError(RuntimeError):
    """The remote store cannot be reached or holds something wrong; one line."""


def open_store(root, url: str | None, options: dict | None = None):
    """The local store at `root`, sharing its published artifacts through `url` when given."""
    from posttrain.artifacts import Store

    return Store(root, RemoteStore(url, options) if url else None)


class RemoteStore:
    def __init__(self, url: str, options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        storage_options = dict(options or {})
        if self.url.startswith("s3://") and "endpoint_url" in storage_options:
            # s3fs takes the endpoint through the client's arguments
            storage_options.setdefault("client_kwargs", {})["endpoint_url"] = storage_options.pop("endpoint_url")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **storage_options)
        self.base = self.base.rstrip("/")

    def _key(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def has(self, relative_folder: str) -> bool:
        try:
            return self.fs.exists(self._key(f"{relative_folder}/{MANIFEST}"))
        except Exception as exc:  # botocore/aiohttp errors have no common base worth naming
            raise RemoteStoreError(f"{self.url}: cannot be read ({type(exc).__name__}: {exc})") from exc

    def upload(self, artifact: Artifact) -> None:
        """Every file of the published artifact, then its manifest (already there: nothing to do)."""
        relative = artifact.manifest["path"]
        if self.has(relative):
            return
        for name in sorted(artifact.manifest.get("files", {})):
            self.fs.put_file(str(artifact.path / name), self._key(f"{relative}/{name}"))
        self.fs.put_file(str(artifact.path / MANIFEST), self._key(f"{relative}/{MANIFEST}"))

    def download(self, relative_folder: str, staging: Path) -> Artifact:
        """The remote artifact into `staging` (a folder the caller then moves into place), checked
        against its manifest; raises RemoteStoreError naming the object when a file does not match."""
        staging.mkdir(parents=True, exist_ok=True)
        manifest = json.loads(self.fs.cat_file(self._key(f"{relative_folder}/{MANIFEST}")))
        for name in sorted(manifest.get("files", {})):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._key(f"{relative_folder}/{name}"), str(target))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        artifact = Artifact(staging, manifest)
        try:
            check_files(artifact, rehash=True)
        except TamperedArtifact as exc:
            raise RemoteStoreError(f"{self.url}/{relative_folder}: does not match its manifest ({exc}); refused") from exc
        for name, (_, mtime_ns, _) in manifest.get("files", {}).items():  # verified: later lookups need not re-hash
            os.utime(staging / name, ns=(mtime_ns, mtime_ns))
        return artifact
