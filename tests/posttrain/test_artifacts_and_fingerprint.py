"""The store's promises: a folder counts only with its manifest, publishing is atomic, and the
fingerprint changes exactly when something that shapes the output changes."""

import json
import os
import types
from pathlib import Path

import pytest

import tasks.sft
from posttrain.artifacts import MANIFEST, Artifact, Store, TamperedArtifact, check_files, digest_dir
from posttrain.config import LauncherConfig, SftConfig
from posttrain.fingerprint import fingerprint
from posttrain.runner import execute_stage


def test_digest_ignores_manifest_but_not_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = digest_dir(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    assert digest_dir(tmp_path) == first
    (tmp_path / "a.txt").write_text("two")
    assert digest_dir(tmp_path) != first


def test_publish_writes_manifest_last_and_lookup_needs_it(tmp_path):
    store = Store(tmp_path)
    assert store.lookup("sft", "abc") is None
    staging = store.staging_dir("sft", "abc")
    (staging / "weights.bin").write_text("w")
    artifact = store.publish("sft", "abc", Artifact.draft(staging, {"loss": 1.0}), {"seed": 0})
    assert artifact.path == tmp_path / "store" / "sft" / "abc"
    assert not staging.exists()
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    assert manifest["metrics"] == {"loss": 1.0}
    assert manifest["path"] == "store/sft/abc"  # relative to the store root
    assert manifest["digest"] == digest_dir(artifact.path)
    assert store.lookup("sft", "abc").digest == artifact.digest
    # A folder without a manifest does not count.
    (tmp_path / "store" / "sft" / "half").mkdir()
    assert store.lookup("sft", "half") is None


def test_a_forced_rebuild_replaces_a_published_folder_only_when_its_bytes_differ(tmp_path):
    store = Store(tmp_path)

    def build(content: str, replace: bool) -> Artifact:
        staging = store.staging_dir("sft", "abc")
        (staging / "weights.bin").write_text(content)
        return store.publish("sft", "abc", Artifact.draft(staging, {}), {"seed": 0}, replace=replace)

    first = build("w1", replace=False)
    assert build("w2", replace=False).digest == first.digest  # a twin's build never moves a finished folder
    assert build("w1", replace=True).digest == first.digest and not (tmp_path / "replaced").exists()  # same bytes: kept
    forced = build("w2", replace=True)
    assert forced.digest != first.digest and (forced.path / "weights.bin").read_text() == "w2"
    (aside,) = (tmp_path / "replaced" / "sft").iterdir()
    assert aside.name.startswith("abc-") and Artifact.load(aside).digest == first.digest
    assert [artifact.digest for artifact in store.artifacts("sft")] == [forced.digest]  # out of the store


def _inputs(digest="d1"):
    return {"base": Artifact(Path("."), {"digest": digest})}


def test_fingerprint_changes_with_config_inputs_seed_but_not_launcher():
    section = SftConfig(max_steps=10, seed=0)
    key = fingerprint("sft", tasks.sft, section, _inputs())
    assert key == fingerprint("sft", "tasks.sft", SftConfig(max_steps=10, seed=0), _inputs())  # by name: nothing imported
    assert key != fingerprint("sft", tasks.sft, SftConfig(max_steps=11, seed=0), _inputs())
    assert key != fingerprint("sft", tasks.sft, section, _inputs("d2"))
    assert key != fingerprint("sft", tasks.sft, SftConfig(max_steps=10, seed=1), _inputs())
    assert key != fingerprint("reward", tasks.sft, section, _inputs())
    relaunched = SftConfig(max_steps=10, seed=0, launcher=LauncherConfig(kind="subprocess"))
    assert key == fingerprint("sft", tasks.sft, relaunched, _inputs())


def test_fingerprint_changes_with_stage_source(tmp_path):
    source = tmp_path / "fake_stage.py"
    source.write_text("x = 1\n")
    module = types.ModuleType("fake_stage")
    module.__file__ = str(source)
    before = fingerprint("fake", module, {}, {})
    source.write_text("x = 2\n")
    assert fingerprint("fake", module, {}, {}) != before


def _counting_stage(tmp_path):
    calls = tmp_path / "calls"
    module = types.ModuleType("counting_stage")
    module.__file__ = __file__

    def run(config, inputs, out_dir):
        calls.write_text(str(int(calls.read_text() if calls.exists() else 0) + 1))
        (out_dir / "out.txt").write_text(str(config))
        return Artifact.draft(out_dir, {"value": 1})

    module.run = run
    return module, calls


def test_execute_stage_caches_by_fingerprint(tmp_path):
    module, calls = _counting_stage(tmp_path)
    store = Store(tmp_path / "root")
    first = execute_stage("count", module, {"k": 1}, {}, store, seed=0)
    second = execute_stage("count", module, {"k": 1}, {}, store, seed=0)
    third = execute_stage("count", module, {"k": 2}, {}, store, seed=0)
    assert (first.cache_hit, second.cache_hit, third.cache_hit) == (False, True, False)
    assert calls.read_text() == "2"
    assert second.artifact.digest == first.artifact.digest
    assert first.artifact.manifest["config"] == {"k": 1}
    assert {"git", "versions", "seed", "created_at", "fingerprint"} <= set(first.artifact.manifest)


def test_failed_stage_leaves_no_artifact_and_keeps_finished_ones(tmp_path):
    module, _ = _counting_stage(tmp_path)
    store = Store(tmp_path / "root")
    finished = execute_stage("count", module, {"k": 1}, {}, store, seed=0)

    def boom(config, inputs, out_dir):
        (out_dir / "partial.bin").write_text("half")
        raise ValueError("bad row")

    module.run = boom
    with pytest.raises(ValueError, match="bad row"):
        execute_stage("count", module, {"k": 9}, {}, store, seed=0)
    leftovers = sorted(p.name for p in (tmp_path / "root" / "store" / "count").iterdir())
    # The finished artifact is untouched; the failed attempt stays as a staging folder for diagnosis
    # (its partial file is there) but has no manifest, so it never counts.
    assert leftovers[1] == finished.artifact.path.name
    assert leftovers[0].startswith(".tmp-")
    assert (tmp_path / "root" / "store" / "count" / leftovers[0] / "partial.bin").is_file()
    assert not (tmp_path / "root" / "store" / "count" / leftovers[0] / "manifest.json").exists()
    assert store.lookup("count", finished.artifact.fingerprint) is not None
    # The next attempt at the same work removes an earlier (here: another process's) staging folder
    # of that fingerprint, so they never pile up; other fingerprints' are left alone.
    stage_dir = tmp_path / "root" / "store" / "count"
    dead_attempt = stage_dir / leftovers[0].replace(f"-{os.getpid()}", "-99999999")
    (stage_dir / leftovers[0]).rename(dead_attempt)
    (stage_dir / ".tmp-otherfingerprint-99999999").mkdir()
    with pytest.raises(ValueError, match="bad row"):
        execute_stage("count", module, {"k": 9}, {}, store, seed=0)
    assert sorted(p.name for p in stage_dir.glob(".tmp-*")) == sorted([leftovers[0], ".tmp-otherfingerprint-99999999"])


# ----------------------------------------------------------------------------- integrity of a hit


def _published(tmp_path):
    module, _ = _counting_stage(tmp_path)
    store = Store(tmp_path / "root")
    outcome = execute_stage("count", module, {"k": 1}, {}, store, seed=0, run_id="run-1")
    return store, outcome.artifact


def test_manifest_records_files_and_the_building_run(tmp_path):
    _, artifact = _published(tmp_path)
    size, mtime_ns, sha = artifact.manifest["files"]["out.txt"]
    assert size == (artifact.path / "out.txt").stat().st_size and mtime_ns == (artifact.path / "out.txt").stat().st_mtime_ns
    assert artifact.manifest["built_by"]["run_id"] == "run-1"
    assert artifact.manifest["code"]["modules"] and artifact.manifest["versions"]["python"].startswith("cpython-")
    # The building process's own versions (a worker's may differ from the planner's key); here the same.
    assert artifact.manifest["built_by"]["versions"] == artifact.manifest["versions"]
    assert "versions_differ" not in artifact.manifest["built_by"]


def test_a_stage_built_with_other_library_versions_than_its_key_says_so(tmp_path, capsys):
    # As on a GPU worker whose torch is another build than the planning process's.
    from posttrain.fingerprint import stage_key

    module, _ = _counting_stage(tmp_path)
    store = Store(tmp_path / "root")
    key = stage_key("count", module, {"k": 1}, {})
    key.parts["versions"] = {**key.parts["versions"], "python": "cpython-0.0.0"}
    artifact = execute_stage("count", module, {"k": 1}, {}, store, seed=0, key=key).artifact
    assert artifact.manifest["built_by"]["versions_differ"] == {"python": {"key": "cpython-0.0.0", "built_with": artifact.manifest["built_by"]["versions"]["python"]}}
    assert "built with other library versions than the run's key: python" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda folder: (folder / "out.txt").write_text("x"), "out.txt changed size"),
        (lambda folder: (folder / "out.txt").write_text("{'k': 2}"), "out.txt changed content"),  # same size, new mtime
        (lambda folder: (folder / "out.txt").unlink(), "out.txt is missing"),
        (lambda folder: (folder / "sneaked.jsonl").write_text("{}"), "sneaked.jsonl was added"),
    ],
)
def test_a_tampered_artifact_is_refused_with_one_line(tmp_path, tamper, problem):
    store, artifact = _published(tmp_path)
    tamper(artifact.path)
    with pytest.raises(TamperedArtifact) as caught:
        store.lookup("count", artifact.fingerprint)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"store/count/{artifact.fingerprint}: {problem}")


def test_a_touched_but_unchanged_file_is_rehashed_and_accepted(tmp_path):
    store, artifact = _published(tmp_path)
    os.utime(artifact.path / "out.txt", ns=(1, 1))  # what `cp -r` without -a does to mtimes
    assert store.lookup("count", artifact.fingerprint).digest == artifact.digest


def test_verify_rehashes_and_finds_same_size_same_mtime_edits(tmp_path):
    store, artifact = _published(tmp_path)
    target = artifact.path / "out.txt"
    stat = target.stat()
    target.write_text("{'k': 3}")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # invisible to the cheap check
    assert store.lookup("count", artifact.fingerprint) is not None
    with pytest.raises(TamperedArtifact, match="out.txt changed content"):
        check_files(artifact, rehash=True)
    from posttrain.cli import main

    assert main(["verify", "--root", str(store.root)]) == 1
    assert main(["verify", str(artifact.path), "--root", str(store.root)]) == 1
