"""Inputs from outside the store enter the key by content (files, folders) or by commit (hub ids)."""

from __future__ import annotations

import os

import pytest

from posttrain import outside
from posttrain.config import ConfigError, DataConfig, ModelConfig, OutsideInput, load_config
from posttrain.outside import DigestMemo, OutsideInputError, outside_digest, resolve_hub_revision


def digest(path, memo=None) -> str:
    return outside_digest("data.sources[0]", OutsideInput("path", str(path)), memo or DigestMemo(None))


def test_a_flipped_byte_or_appended_rows_change_the_digest(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b'{"prompt": "a", "response": "b"}\n')
    first = digest(source)
    source.write_bytes(b'{"prompt": "a", "response": "c"}\n')  # same size, one byte
    flipped = digest(source)
    with source.open("ab") as handle:
        handle.write(b'{"prompt": "d", "response": "e"}\n')
    assert len({first, flipped, digest(source)}) == 3


def test_folder_digest_covers_names_and_contents(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    first = digest(tmp_path / "model")
    (tmp_path / "model" / "extra.bin").write_bytes(b"x")
    second = digest(tmp_path / "model")
    (tmp_path / "model" / "extra.bin").rename(tmp_path / "model" / "other.bin")
    assert len({first, second, digest(tmp_path / "model")}) == 3


def test_memo_reuses_a_digest_until_the_file_changes(tmp_path, monkeypatch):
    source = tmp_path / "big.jsonl"
    source.write_bytes(b"x" * 1000)
    hashed = []
    real = outside.file_sha256
    monkeypatch.setattr(outside, "file_sha256", lambda path: hashed.append(path) or real(path))
    memo_path = tmp_path / "cache" / "memo.json"
    first = outside.outside_digests({"s": OutsideInput("path", str(source))}, DigestMemo(memo_path))
    again = outside.outside_digests({"s": OutsideInput("path", str(source))}, DigestMemo(memo_path))  # a new process
    assert first == again and len(hashed) == 1
    assert str(tmp_path) not in memo_path.read_text()  # the memo names no path outside the store
    stat = source.stat()
    source.write_bytes(b"y" * 1000)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the ctime still moved
    changed = outside.outside_digests({"s": OutsideInput("path", str(source))}, DigestMemo(memo_path))
    assert changed != first and len(hashed) == 2


def test_missing_path_is_one_line(tmp_path):
    with pytest.raises(OutsideInputError, match=r"^data.sources\[0\]: .*nope.jsonl: no such file or folder$"):
        digest(tmp_path / "nope.jsonl")


def test_sections_declare_their_outside_inputs(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("")
    data = DataConfig(sources=[{"role": "instruction", "generate": {"rows": 5}}, {"path": str(source), "format": "instruction"}, {"path": "org/dataset", "format": "hh", "revision": "v1"}])
    assert data.outside_inputs() == {
        "data.sources[1]": OutsideInput("path", str(source)),
        "data.sources[2]": OutsideInput("hub_dataset", "org/dataset", "v1"),
    }
    assert ModelConfig().outside_inputs() == {}
    assert ModelConfig(name_or_path=str(tmp_path)).outside_inputs()["model.name_or_path"].kind == "path"
    assert ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B", revision="main").outside_inputs()["model.name_or_path"] == OutsideInput("hub_model", "Qwen/Qwen2.5-0.5B", "main")


def test_a_missing_source_file_is_found_when_the_config_is_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  sources:\n    - {{path: {tmp_path / 'gone.jsonl'}, format: instruction}}\n    - {{role: preference, generate: {{rows: 5}}}}\n")
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: .*gone.jsonl: no such file or folder"):
        load_config(config).check_outside_paths(str(config))


def test_hub_ids_enter_by_commit(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert resolve_hub_revision("model", "org/pinned", commit) == commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--cached" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    resolve_hub_revision.cache_clear()
    item = OutsideInput("hub_model", "org/cached", None)
    assert outside_digest("model.name_or_path", item, DigestMemo(None)) == f"commit:{commit}"
    with pytest.raises(OutsideInputError, match=r"model 'org/unknown': cannot resolve revision 'main' to a commit \(offline .*pin it"):
        outside_digest("model.name_or_path", OutsideInput("hub_model", "org/unknown"), DigestMemo(None))
    resolve_hub_revision.cache_clear()
