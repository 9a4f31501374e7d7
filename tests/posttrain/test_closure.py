"""The code part of the cache key: import closures found from the source, declared data files,
library versions — and what does not count (comments, docstrings, the __main__ launcher block)."""

from __future__ import annotations

import textwrap

import pytest

from posttrain import closure
from posttrain.closure import parse_module, stage_code


def write_project(root, files: dict[str, str]):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_real_stage_closures_follow_the_imports():
    sft = stage_code("tasks.sft")
    # jsonl reads every training stage's inputs: it was missing from the old hand-kept list.
    assert {"tasks", "tasks.sft", "posttrain.jsonl", "posttrain.formatting", "posttrain.models", "data_contracts.tokenized"} <= set(sft.modules)
    assert "tasks.data" not in sft.modules and "posttrain.cli" not in sft.modules and "flows.pipeline" not in sft.modules
    # The `if __name__ == "__main__":` launcher block is not what the stage computes.
    assert "posttrain.stage_cli" not in sft.modules
    assert sft.data_files == {"data_contracts/sft_tokenized.json": closure.file_sha256(closure.PROJECT_ROOT / "data_contracts/sft_tokenized.json")}
    assert {"trl", "torch", "transformers", "numpy", "pyarrow", "datasets", "great-expectations"} <= set(sft.distributions)

    data = stage_code("tasks.data")
    assert {"tasks.data.dedup", "tasks.data.ingest", "data_contracts.check", "posttrain.models"} <= set(data.modules)
    assert set(data.data_files) == {f"data_contracts/{role}_clean.json" for role in ("instruction", "preference", "prompt")}
    benchmarks = stage_code("tasks.benchmarks")
    assert "posttrain.models" not in benchmarks.modules  # formatting or model code does not rebuild the benchmark items
    assert "torch" not in benchmarks.distributions and "pyyaml" in benchmarks.distributions


def test_comments_docstrings_and_layout_do_not_count_but_code_does(tmp_path):
    root = write_project(tmp_path, {"pkg/__init__.py": "", "pkg/stage.py": '"""Doc."""\nX = 1  # a comment\n'})
    before = parse_module("pkg.stage", root).digest
    (root / "pkg/stage.py").write_text('"""Another doc."""\n\n\nX = 1\n# more comments\n')
    assert parse_module("pkg.stage", root).digest == before
    (root / "pkg/stage.py").write_text('"""Doc."""\nX = 2\n')
    assert parse_module("pkg.stage", root).digest != before


def test_lazy_relative_and_from_imports_are_followed(tmp_path):
    root = write_project(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/stage.py": """
                from pkg import helpers
                from . import relative_one

                def run():
                    import numpy
                    from pkg.lazy import thing
                    return thing

                if __name__ == "__main__":
                    from pkg import launcher
            """,
            "pkg/helpers.py": "import pkg.deep.leaf\n",
            "pkg/relative_one.py": "",
            "pkg/lazy.py": "thing = 1\n",
            "pkg/launcher.py": "",
            "pkg/deep/__init__.py": "",
            "pkg/deep/leaf.py": "import yaml\n",
            "pkg/unused.py": "",
        },
    )
    code = stage_code("pkg.stage", root)
    assert set(code.modules) == {"pkg", "pkg.stage", "pkg.helpers", "pkg.relative_one", "pkg.lazy", "pkg.deep", "pkg.deep.leaf"}
    assert code.third_party == {"numpy", "yaml"}
    assert {"numpy", "pyyaml"} <= set(code.distributions)


def test_declared_data_files_are_hashed_and_must_exist(tmp_path):
    root = write_project(tmp_path, {"pkg/__init__.py": "", "pkg/stage.py": 'DATA_FILES = ("suites/a.json",)\n', "suites/a.json": "{}"})
    first = stage_code("pkg.stage", root).data_files
    (root / "suites/a.json").write_text('{"x": 1}')
    assert stage_code("pkg.stage", root).data_files != first
    (root / "suites/a.json").unlink()
    with pytest.raises(ValueError, match=r"stage.py: DATA_FILES names suites/a.json, which does not exist"):
        stage_code("pkg.stage", root)


def test_versions_include_python_and_follow_the_installed_set(monkeypatch):
    versions = closure.environment_versions(["numpy", "torch"])
    assert versions["python"].startswith("cpython-3.")
    assert versions["numpy"] == closure.installed_versions()["numpy"]
    faked = {**closure.installed_versions(), "numpy": "0.0.1"}
    monkeypatch.setattr(closure, "installed_versions", lambda: faked)
    assert closure.environment_versions(["numpy"])["numpy"] == "0.0.1"
