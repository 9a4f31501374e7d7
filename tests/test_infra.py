"""infra/: the compose file binds every port to loopback and holds no credentials; the Prefect
deployment file names a flow that exists, one run at a time."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|WEBHOOK", re.IGNORECASE)


def test_compose_binds_loopback_only_and_takes_credentials_from_the_env_file():
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "prefect", "mlflow", "gpu-worker"} <= set(services)
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:-)?\}", str(value)), f"{name}.{key} must come from the env file, not be written here"
        for part in re.findall(r"://([^@/\s]+)@", str(service.get("command", "")) + str(service.get("environment", ""))):
            assert re.fullmatch(r"\$\{\w+\}:\$\{\w+\}", part), f"{name}: credentials in a URL must be ${{VAR}} references ({part})"
    worker = services["gpu-worker"]
    assert worker["command"] == "posttrain worker --pool gpu"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # The env file with the real values is never committed; the example holds placeholders only.
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env must be ignored by git"
    example = dict(line.split("=", 1) for line in (REPO / "infra" / "env.example").read_text().splitlines() if line and not line.startswith("#"))
    assert all(value in ("", "posttrain") or value.startswith("change-me") for value in example.values())


def test_prefect_yaml_deploys_the_scheduled_flow_one_run_at_a_time():
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    path, function = deployment["entrypoint"].split(":")
    tree = ast.parse((REPO / path).read_text())
    assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert deployment["concurrency_limit"] == 1
    assert deployment["schedules"][0]["cron"] == "0 3 * * 1"
    assert (REPO / deployment["parameters"]["config_path"]).is_file()
