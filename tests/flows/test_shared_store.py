"""A store shared through an S3-compatible server (moto_server on 127.0.0.1): what one machine
publishes is a cache hit for another, downloaded and checked; MLflow's artifacts land in the bucket
too; an object edited in the bucket is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from posttrain.config import local_copy_of
from tests.kill_harness import REPO, newest_record, run_cli, start_worker, stop_group

BUCKET = "posttrain-shared"


@pytest.fixture
def s3_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=(tmp_path / "moto.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "moto.log").read_text()[-2000:])
            time.sleep(0.3)
    yield url
    stop_group(server, 20)


@pytest.mark.slow
def test_two_machines_share_work_through_an_s3_store(tmp_path, prefect_api, s3_server):
    import boto3

    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_server, **{key.lower(): value for key, value in credentials.items() if key != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    env = {**credentials, "PREFECT_API_URL": prefect_api, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    shared = [
        "--set", f"shared_store=s3://{BUCKET}/team", "--set", f"shared_store_options.endpoint_url={s3_server}",
        "--set", f"tracking.artifact_location=s3://{BUCKET}/mlflow", "--until", "sft",
    ]

    def keys(prefix: str) -> list[str]:
        return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix) for item in page.get("Contents", [])]

    first_root = tmp_path / "machine-a"
    first = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={first_root}", *shared], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    built = newest_record(first_root)
    assert all(info["state"] == "built" for info in built["stages"].values())
    stored = keys("team/store/")
    for stage, info in built["stages"].items():
        manifest = json.loads((first_root / info["path"] / "manifest.json").read_text())
        assert f"team/{info['path']}/manifest.json" in stored, stage
        assert {f"team/{info['path']}/{name}" for name in manifest["files"]} <= set(stored), stage
    assert any(key.endswith("/manifest.json") for key in keys("mlflow/")), "MLflow's artifacts go to the bucket"
    assert not (first_root / "mlartifacts").exists()

    # Another machine, whose store_root is the bucket's URI itself (its working copy under
    # POSTTRAIN_CACHE): every stage comes from the bucket.
    cache = tmp_path / "machine-b-cache"
    second_root = local_copy_of(f"s3://{BUCKET}/team", cache)
    second = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root=s3://{BUCKET}/team/", *shared], env={**env, "POSTTRAIN_CACHE": str(cache)})
    assert second.returncode == 0, second.stderr[-3000:]
    pulled = newest_record(second_root)
    assert all(info["state"] == "cached" for info in pulled["stages"].values()), pulled["stages"]
    for stage, info in pulled["stages"].items():
        assert (second_root / info["path"] / "model.safetensors").read_bytes() == (first_root / info["path"] / "model.safetensors").read_bytes() if stage == "sft" else True
        assert json.loads((second_root / info["path"] / "manifest.json").read_text())["digest"] == json.loads((first_root / info["path"] / "manifest.json").read_text())["digest"]
    verify = run_cli(["verify", "--root", str(second_root)])
    assert verify.returncode == 0 and "4 of 4 artifacts match" in verify.stdout

    # An object edited in the bucket after publishing is refused, in one line, on the next machine.
    sft_key = f"team/{built['stages']['sft']['path']}/model.safetensors"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=sft_key)["Body"].read())
    body[-1] ^= 1
    s3.put_object(Bucket=BUCKET, Key=sft_key, Body=bytes(body))
    third_root = tmp_path / "machine-c"
    third = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={third_root}", *shared], env=env)
    assert third.returncode == 1
    errors = [line for line in third.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not match its manifest" in errors[0] and "model.safetensors" in errors[0], third.stderr[-2000:]
    assert not list((third_root / "store" / "sft").glob("*/manifest.json"))  # nothing of it was taken


@pytest.mark.slow
def test_a_stage_runs_on_a_worker_and_comes_back_through_the_shared_store(tmp_path, prefect_api, s3_server):
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    env = {**os.environ, **credentials, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    pool = f"gpu-{tmp_path.name[-10:]}".replace("_", "-")
    workdir = tmp_path / "gpu-machine"
    workdir.mkdir()
    worker = start_worker(pool, workdir, env, tmp_path / "worker.log")
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name(f"posttrain-stage/{pool}")
                    break
                except Exception:
                    assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(1)
        root = tmp_path / "main"
        run = run_cli(
            ["run", "configs/smoke.yaml", "--set", f"store_root={root}", "--set", f"shared_store=s3://{BUCKET}/team",
             "--set", f"shared_store_options.endpoint_url={s3_server}", "--set", "sft.launcher.kind=deployment",
             "--set", f"sft.launcher.pool={pool}", "--until", "sft"],
            env={**credentials, "PREFECT_API_URL": prefect_api},
        )
        assert run.returncode == 0, run.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        record = newest_record(root)
        assert [record["stages"][name]["state"] for name in ("base", "benchmarks", "data", "sft")] == ["built"] * 4
        sft = record["stages"]["sft"]
        here = json.loads((root / sft["path"] / "manifest.json").read_text())
        # Built by the worker's flow run, in the worker's own store, then pulled here through the bucket.
        assert here["built_by"]["pid"] != record["pid"] and here["built_by"]["run_id"] == record["run_id"]
        on_worker = workdir / "posttrain-store" / sft["path"] / "manifest.json"
        assert on_worker.is_file() and json.loads(on_worker.read_text())["digest"] == here["digest"]
        assert not (workdir / "posttrain-store" / "runs").exists()  # the worker keeps artifacts, not run records
        assert here["fingerprint"] == sft["fingerprint"]
        assert sft["mlflow_run_id"]  # logged by the pipeline, like any stage
    finally:
        stop_group(worker)
