"""A training stage run as its own process (`python -m tasks.sft`, what `accelerate launch` wraps)
publishes the same kind of artifact as an in-process run, and shares its cache."""

import tasks.sft
from posttrain.artifacts import Store
from posttrain.config import LauncherConfig, SftConfig
from posttrain.runner import StageError, execute_stage


def test_sft_as_subprocess_publishes_and_shares_the_cache(tiny_base, tiny_data, tmp_path):
    store = Store(tmp_path)
    section = SftConfig(max_steps=5, batch_size=8, eval_rows=16, seed=0)
    inputs = {"base": tiny_base, "data": tiny_data}
    outcome = execute_stage("sft", tasks.sft, section, inputs, store, seed=0, launcher=LauncherConfig(kind="subprocess"))
    assert not outcome.cache_hit
    manifest = outcome.artifact.manifest
    assert manifest["metrics"]["train_steps"] == 5
    assert manifest["method"] == "full"
    assert (outcome.artifact.path / "model.safetensors").is_file()
    assert not (outcome.artifact.path / "_draft.json").exists()  # the hand-over file is not part of the artifact
    # The launcher is not part of the fingerprint: the in-process run finds the same artifact.
    again = execute_stage("sft", tasks.sft, section, inputs, store, seed=0)
    assert again.cache_hit and again.artifact.digest == outcome.artifact.digest


def test_failing_subprocess_is_a_stage_error(tiny_base, tiny_data, tmp_path):
    launcher = LauncherConfig(kind="subprocess", command=["python", "-c", "import sys; sys.exit(3)", "--"])
    section = SftConfig(max_steps=1, seed=0)
    try:
        execute_stage("sft", tasks.sft, section, {"base": tiny_base, "data": tiny_data}, Store(tmp_path), seed=0, launcher=launcher)
    except StageError as error:
        assert "exited with status 3" in str(error)
    else:
        raise AssertionError("a failing subprocess must raise StageError")
