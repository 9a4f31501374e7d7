"""Untrusted artifacts and secrets: no unpickling anywhere in the code, no remote code unless the
config says so, and credentials from the environment never written to the store, a record, a log
or MLflow."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("posttrain", "tasks", "flows", "data_contracts", "bench")


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_code_path_unpickles_or_trusts_remote_code():
    """Weights only as safetensors: no pickle.load(s), no torch.load without weights_only=True, no
    literal trust_remote_code=True, and every from_pretrained asks for safetensors."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node, name in calls(tree):
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
                    found.append(f"{where}: {name}")
                if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
                trust = keywords.get("trust_remote_code")
                if isinstance(trust, ast.Constant) and trust.value is True:
                    found.append(f"{where}: trust_remote_code=True")
                if name.endswith("AutoModelForCausalLM.from_pretrained") or name.endswith("AutoModelForSequenceClassification.from_pretrained"):
                    safetensors = keywords.get("use_safetensors")
                    if not (isinstance(safetensors, ast.Constant) and safetensors.value is True):
                        found.append(f"{where}: {name} without use_safetensors=True")
    assert not found, "\n".join(found)


def test_a_model_folder_with_custom_code_is_refused_without_running_it(tmp_path):
    from posttrain.models import ModelLoadError, load_causal_lm

    marker = tmp_path / "ran"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    }))
    payload = f"open({str(marker)!r}, 'w').write('executed')\nfrom transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    (folder / "configuration_evil.py").write_text(payload)
    (folder / "modeling_evil.py").write_text(payload)
    with pytest.raises(ModelLoadError, match=r"contains custom code .* Refused: set model.trust_remote_code: true only for code you trust"):
        load_causal_lm(folder)  # the default, as every stage calls it unless model.trust_remote_code is set
    assert not marker.exists()


@pytest.mark.slow
def test_credentials_in_the_environment_are_never_written(tmp_path):
    """A run with secrets in its environment (as a team's CI or a worker has them): none of them is
    in any file under the store root afterwards — records, logs, manifests, MLflow's database."""
    secrets = {
        "HF_TOKEN": "hf_SeCrEtToKeN0123456789",
        "AWS_SECRET_ACCESS_KEY": "aws/SeCrEt+Key0123456789",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-SeCrEt-Pass-0123",
        "POSTTRAIN_NOTIFY_WEBHOOK": "https://hooks.example/SeCrEt-0123",
    }
    root = tmp_path / "root"
    command = [sys.executable, "-m", "posttrain.cli", "run", "configs/smoke.yaml", "--set", f"store_root={root}", "--until", "sft"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **secrets}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [path for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files) and any(path.suffix == ".log" for path in files)
    leaks = [
        f"{path.relative_to(root)}: {name}"
        for path in files
        for name, value in secrets.items()
        if value.encode() in path.read_bytes()
    ]
    assert not leaks, leaks
    assert not any(value in result.stdout + result.stderr for value in secrets.values())
