"""The store's promises: a folder counts only with its manifest, publishing is atomic, and the
fingerprint changes exactly when something that shapes the output changes."""

import json
import types
from pathlib import Path

import pytest

import tasks.sft
from posttrain.artifacts import MANIFEST, Artifact, Store, digest_dir
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


def _inputs(digest="d1"):
    return {"base": Artifact(Path("."), {"digest": digest})}


def test_fingerprint_changes_with_config_inputs_seed_but_not_launcher():
    section = SftConfig(max_steps=10)
    key = fingerprint("sft", tasks.sft, section, _inputs(), seed=0)
    assert key == fingerprint("sft", tasks.sft, SftConfig(max_steps=10), _inputs(), seed=0)
    assert key != fingerprint("sft", tasks.sft, SftConfig(max_steps=11), _inputs(), seed=0)
    assert key != fingerprint("sft", tasks.sft, section, _inputs("d2"), seed=0)
    assert key != fingerprint("sft", tasks.sft, section, _inputs(), seed=1)
    assert key != fingerprint("reward", tasks.sft, section, _inputs(), seed=0)
    relaunched = SftConfig(max_steps=10, launcher=LauncherConfig(kind="subprocess"))
    assert key == fingerprint("sft", tasks.sft, relaunched, _inputs(), seed=0)


def test_fingerprint_changes_with_stage_source(tmp_path):
    source = tmp_path / "fake_stage.py"
    source.write_text("x = 1\n")
    module = types.ModuleType("fake_stage")
    module.__file__ = str(source)
    before = fingerprint("fake", module, {}, {}, seed=0)
    source.write_text("x = 2\n")
    assert fingerprint("fake", module, {}, {}, seed=0) != before


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
