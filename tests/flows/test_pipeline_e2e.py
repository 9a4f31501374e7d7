"""End to end through the real Prefect flow and MLflow, each run in a new process (the CLI).

One store is shared by the tests of this module, in order: a first run builds every stage; an
unchanged second run is all cache hits; an evaluate-only change re-runs only evaluate; a reward
change leaves DPO cached.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.runs import find_run, list_runs

REPO = Path(__file__).resolve().parents[2]
MODELS = ["base", "sft", "align-dpo", "align-ppo", "align-grpo", "student", "quantize-nf4", "quantize-int8"]
STAGES = [
    "base", "benchmarks", "data", "sft", "reward", "align-dpo", "align-ppo", "align-grpo", "distill",
    "evaluate-base", "evaluate-sft", "evaluate-align-dpo", "evaluate-align-ppo", "evaluate-align-grpo", "evaluate-student",
    "quantize", "evaluate-quantize-nf4", "evaluate-quantize-int8", "report",
]


def posttrain(root: Path, *args: str, config: str = "configs/smoke.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain.cli", "run", config, "--set", f"store_root={root}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def record(root: Path) -> dict:
    return find_run(root, "smoke")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def first_run(root):
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return record(root)


def test_first_run_builds_every_stage(first_run, root):
    assert first_run["status"] == "succeeded"
    assert list(first_run["stages"]) == STAGES
    assert all(info["state"] == "built" for info in first_run["stages"].values())
    for stage, info in first_run["stages"].items():
        manifest = json.loads((root / info["path"] / "manifest.json").read_text())
        assert manifest["fingerprint"] == info["fingerprint"]
        assert manifest["git"]["commit"]
        assert "python" in manifest["versions"]
        assert ("torch" in manifest["versions"]) == (stage != "benchmarks")  # the benchmark items need no torch
        assert manifest["built_by"]["run_id"] == first_run["run_id"]
        assert manifest["path"] == f"store/{stage}/{info['fingerprint']}"  # relative paths
    assert list(first_run["results"]) == MODELS  # the report's schema: {model: {task: {metric: value}}}
    for model in MODELS:
        assert {"copy", "add", "mean"} <= set(first_run["results"][model])
        assert "exact_match" in first_run["results"][model]["sort"] and "ece_scaled" in first_run["results"][model]["mean"]
    assert first_run["results"]["align-dpo"]["mean"]["win_rate_vs_sft"] >= 0
    assert first_run["gate"]["decision"] == "promoted" and first_run["gate"]["reason"] == "no champion yet"


def test_mlflow_has_parent_and_one_child_per_stage(first_run, root):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([experiment.experiment_id])
    parent_id = first_run["mlflow_parent_run_id"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(run.data.tags["posttrain.stage"] for run in children) == sorted(STAGES)
    by_stage = {run.data.tags["posttrain.stage"]: run for run in children}
    sft = by_stage["sft"]
    assert sft.data.params["max_steps"] == "8"
    assert "eval_loss" in sft.data.metrics
    assert sft.data.tags["posttrain.upstream.base"] == by_stage["base"].info.run_id
    assert sft.data.tags["posttrain.upstream.data"] == by_stage["data"].info.run_id
    assert sft.data.tags["posttrain.cache_hit"] == "false"
    assert sft.inputs.dataset_inputs, "sft logs the dataset it trained on"
    # The data stage logs each source as a dataset whose digest is its file's sha256 (the first 32 digits).
    data_manifest = json.loads((root / first_run["stages"]["data"]["path"] / "manifest.json").read_text())
    sources = {item.dataset.name: item for item in by_stage["data"].inputs.dataset_inputs}
    assert sorted(sources) == ["instruction:0-instruction.jsonl", "preference:1-preference.jsonl", "prompt:2-prompt.jsonl"]
    instruction = sources["instruction:0-instruction.jsonl"]
    assert instruction.dataset.digest == data_manifest["files"]["raw/0-instruction.jsonl"][2][:32]
    assert [tag.value for tag in instruction.tags if tag.key == "mlflow.data.context"] == ["source"]
    # RL stages log a series per figure (one point per step), the curves, and the hacking verdict.
    ppo = by_stage["align-ppo"]
    assert [m.step for m in client.get_metric_history(ppo.info.run_id, "kl")] == [1, 2, 3]
    assert {"gold_reward", "proxy_reward", "clip_fraction", "explained_variance", "generation_seconds"} <= set(ppo.data.metrics)
    assert "curves.png" in {item.path for item in client.list_artifacts(ppo.info.run_id)}
    assert ppo.data.tags["posttrain.reward_hacking"] == "false"
    assert "zero_variance_fraction" in by_stage["align-grpo"].data.metrics
    dpo_tags = by_stage["align-dpo"].data.tags
    assert "posttrain.upstream.reward" not in dpo_tags  # DPO does not depend on the reward model
    assert "manifest.json" in {item.path for item in client.list_artifacts(sft.info.run_id)}
    # The model itself is an MLflow 3 logged model linked to the run that built it, and a version
    # of the registered model with that run as its source.
    (logged,) = client.search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{sft.info.run_id}'")
    sft_manifest = json.loads((root / first_run["stages"]["sft"]["path"] / "manifest.json").read_text())
    assert logged.name == "sft" and logged.tags["posttrain.digest"] == sft_manifest["digest"]
    assert {"config.json", "model.safetensors"} <= {item.path for item in client.list_logged_model_artifacts(logged.model_id)}
    (version,) = client.search_model_versions("name = 'smoke' and tags.`posttrain.model` = 'sft'")
    # The SQL registry keeps the link in the version's source URI (its model_id column stays empty).
    assert version.run_id == sft.info.run_id and version.source == f"models:/{logged.model_id}"


def test_second_run_in_new_process_is_all_cache_hits(first_run, root):
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    second = record(root)
    assert [info["state"] for info in second["stages"].values()] == ["cached"] * len(STAGES)
    for stage in STAGES:
        assert second["stages"][stage]["fingerprint"] == first_run["stages"][stage]["fingerprint"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    sft_child = client.get_run(second["stages"]["sft"]["mlflow_run_id"])
    assert sft_child.data.tags["posttrain.cache_hit"] == "true"
    assert sft_child.data.tags["posttrain.built_by_run"] == first_run["stages"]["sft"]["mlflow_run_id"]


def test_evaluate_only_change_reruns_only_the_evaluations(first_run, root):
    result = posttrain(root, "--set", "evaluate.max_new_tokens=6")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    scoring = [stage for stage in states if stage.startswith("evaluate-") or stage == "report"]
    assert {states.pop(stage) for stage in scoring} == {"built"}
    assert set(states.values()) == {"cached"}


def test_reward_change_leaves_dpo_cached(first_run, root):
    result = posttrain(root, "--set", "reward.lr=5e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert states["reward"] == "built"
    assert states["align-dpo"] == "cached" and states["align-grpo"] == "cached"  # neither reads the reward model
    assert states["align-ppo"] == "built"  # PPO's reward and critic come from it
    assert states["sft"] == "cached"
    # The reward model ranks best-of-N samples and scores replies: every evaluation reads it.
    assert states["evaluate-sft"] == "built" and states["quantize"] == "cached"


def test_one_align_method_change_leaves_the_other_branches_cached(first_run, root):
    result = posttrain(root, "--set", "align.grpo.temperature=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert (states["align-grpo"], states["evaluate-align-grpo"], states["report"]) == ("built", "built", "built")
    for stage in ("align-dpo", "align-ppo", "evaluate-align-dpo", "evaluate-align-ppo", "evaluate-sft", "distill", "quantize"):
        assert states[stage] == "cached", stage


def test_deleted_artifact_is_rebuilt_despite_prefect_cache(first_run, root):
    """A Prefect cache hit counts only while the stored manifest exists; an identical rebuild
    (same bytes, same digest) leaves everything downstream cached."""
    import shutil

    shutil.rmtree(root / first_run["stages"]["distill"]["path"])
    result = posttrain(root)
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert states.pop("distill") == "built"
    assert set(states.values()) == {"cached"}
    assert (root / first_run["stages"]["distill"]["path"] / "manifest.json").is_file()


def test_sft_max_length_change_leaves_data_cached(first_run, root):
    """The tokenized contract runs in sft at sft.max_length: data does not depend on it."""
    result = posttrain(root, "--set", "sft.max_length=90")
    assert result.returncode == 0, result.stderr[-3000:]
    states = {stage: info["state"] for stage, info in record(root)["stages"].items()}
    assert (states["data"], states["sft"]) == ("cached", "built")
    sft_folder = root / record(root)["stages"]["sft"]["path"]
    assert json.loads((sft_folder / "contracts" / "sft_tokenized.json").read_text())["success"] is True


def _mlflow_runs(store_root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain")
    return client.search_runs([experiment.experiment_id], max_results=5000), experiment


def test_a_tampered_split_is_refused_not_trained_on(first_run, root, tmp_path):
    copy = tmp_path / "tampered"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    split = copy / first_run["stages"]["data"]["path"] / "instruction" / "train.jsonl"
    split.write_text(split.read_text()[:200])  # truncated in place
    result = posttrain(copy, "--set", "sft.lr=1e-3")
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"{first_run['stages']['data']['path']}: instruction/train.jsonl changed size" in line
    assert "Traceback" not in result.stderr
    refused = record(copy)
    assert refused["status"] == "failed" and refused["stages"]["data"]["state"] == "failed" and "sft" not in refused["stages"]


def test_a_copied_and_a_moved_store_work_and_stay_independent(first_run, root, tmp_path):
    original_runs, _ = _mlflow_runs(root)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
    for where in (copy, tmp_path / "moved"):
        if where != copy:
            copy.rename(where)  # mv
        result = posttrain(where)
        assert result.returncode == 0, result.stderr[-3000:]
        latest = record(where)
        assert {info["state"] for info in latest["stages"].values()} == {"cached"}
        runs, experiment = _mlflow_runs(where)
        assert experiment.artifact_location == (where / "mlartifacts").as_uri()
        assert all(run.info.artifact_uri.startswith((where / "mlartifacts").as_uri()) for run in runs)
        parent = next(run for run in runs if run.info.run_id == latest["mlflow_parent_run_id"])
        assert (where / "mlartifacts" / parent.info.run_id / "artifacts" / "config.yaml").is_file()
    # The original store is untouched: no run of the copies was logged into it.
    after, experiment = _mlflow_runs(root)
    assert len(after) == len(original_runs) and experiment.artifact_location == (root / "mlartifacts").as_uri()
    for manifest in (root / "store").glob("*/*/manifest.json"):
        assert str(root) not in manifest.read_text()  # manifests name paths relative to the store root
    for result_file in (root / "prefect" / "results").iterdir():
        payload = json.loads(json.loads(result_file.read_text())["result"])
        assert not Path(payload["path"]).is_absolute()


def test_each_run_keeps_its_own_record_and_log(first_run, root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    listed = subprocess.run([sys.executable, "-m", "posttrain.cli", "runs", "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and first_run["run_id"] in listed.stdout
    records = list_runs(root)
    assert len(records) >= 5 and len({r["run_id"] for r in records}) == len(records)
    assert records[0]["run_id"] == first_run["run_id"] and records[0]["stages"] == first_run["stages"]  # not overwritten
    assert {r["run_id"] for r in records} <= {path.stem for path in (root / "logs").glob("*.log")}
    shown = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "status", first_run["run_id"], "--json", "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0
    data = json.loads(shown.stdout)
    assert data["run_id"] == first_run["run_id"] and data["overrides"] == [f"store_root={root}"]
    assert data["config_sha256"] and data["config"]["sft"]["max_steps"] == 8
    assert all({"fingerprint", "state", "started_at", "finished_at", "mlflow_run_id"} <= set(info) for info in data["stages"].values())


def test_status_shows_the_run(first_run, root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "status", "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0
    for stage in STAGES:
        assert stage in result.stdout


def test_lineage_goes_from_the_champion_back_to_the_sources_with_mlflow_runs(first_run, root):
    import mlflow

    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def lineage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "lineage", *args, "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True)

    result = lineage("champion", "--json")
    assert result.returncode == 0, result.stderr
    chain = json.loads(result.stdout)
    stages = [link["stage"] for link in chain]
    candidate = first_run["gate"]["candidate"]
    assert stages[-1] == {"student": "distill"}.get(candidate, candidate)
    assert stages[:3] == ["base", "benchmarks", "data"] and "sft" in stages  # sources first, the model last
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for link in chain:
        tags = client.get_run(link["mlflow_run"]).data.tags
        assert (tags["posttrain.stage"], tags["posttrain.fingerprint"]) == (link["stage"], link["manifest"]["fingerprint"])
        assert link["manifest"]["git"]["commit"] and link["manifest"]["config"] is not None
    text = lineage(first_run["run_id"])  # a run: its candidate's chain
    assert text.returncode == 0 and "removed by rule: empty" in text.stdout and "generated by the run" in text.stdout
    assert f"built by run {first_run['run_id']}" in text.stdout and "MLflow runs above: mlflow ui" in text.stdout
    report = lineage(first_run["stages"]["report"]["path"], "--json")  # a store folder: the report joins every evaluation
    assert {"evaluate-sft", "evaluate-student", "distill", "quantize"} <= {link["stage"] for link in json.loads(report.stdout)}
    unknown = lineage("v999")
    assert unknown.returncode == 1 and unknown.stderr.count("error:") == 1 and "v999" in unknown.stderr


def test_rerun_from_align_dpo_rebuilds_that_branch_and_what_reads_it(first_run, root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "rerun", first_run["run_id"], "--from", "align-dpo", "--root", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rerun = record(root)
    assert rerun["rerun_of"] == first_run["run_id"]
    built = {name for name, info in rerun["stages"].items() if info["state"] == "built"}
    quantized_dpo = first_run["stages"]["quantize"]["path"] and json.loads(
        (root / first_run["stages"]["quantize"]["path"] / "manifest.json").read_text()
    )["inputs"]["source"]["path"] == first_run["stages"]["align-dpo"]["path"]
    expected = {"align-dpo", "evaluate-align-dpo", "report"} | ({"quantize", "evaluate-quantize-nf4", "evaluate-quantize-int8"} if quantized_dpo else set())
    assert built == expected, sorted(built)
    assert {name for name, info in rerun["stages"].items() if info["state"] == "cached"} == set(STAGES) - expected


def test_bad_config_value_is_one_line_and_exit_2(root):
    result = posttrain(root, "--set", "sft.lr=fast")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1
    assert "sft.lr" in lines[0] and "Traceback" not in result.stderr
