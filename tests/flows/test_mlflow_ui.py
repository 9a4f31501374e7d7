"""Lineage a reviewer can follow in the real MLflow UI, driven in headless Chromium (Debian's
`chromium` and `chromedriver`, through Selenium): the experiment's runs, a pipeline run, its SFT
child run (store folder, links to the runs that built its inputs, the dataset it trained on), the
data run's sources with their digests, and the registered model's `champion` version.

Screenshots go to $POSTTRAIN_UI_SCREENSHOTS when set (docs/lineage/ holds the ones docs/lineage.md
shows), else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.kill_harness import newest_record, run_cli, stop_group

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def mlflow_ui(tmp_path):
    """`mlflow ui` on 127.0.0.1 over a store's database, stopped after the test."""
    servers = []

    def start(root: Path) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mlflow = Path(sys.executable).parent / "mlflow"
        server = subprocess.Popen(
            [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
            stdout=(tmp_path / "mlflow-ui.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        servers.append(server)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow ui did not start: {(tmp_path / 'mlflow-ui.log').read_text()[-2000:]}")

    yield start
    for server in servers:
        stop_group(server)


@pytest.mark.slow
def test_a_reviewer_follows_the_lineage_in_the_mlflow_ui(tmp_path, prefect_api, mlflow_ui):
    if not (CHROMIUM and CHROMEDRIVER):
        # .ci/run installs them and sets POSTTRAIN_REQUIRE_BROWSER, so CI never skips this test.
        if os.environ.get("POSTTRAIN_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path / "store"
    run = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={root}"], env={"PREFECT_API_URL": prefect_api})
    assert run.returncode == 0, run.stderr[-3000:]
    record = newest_record(root)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("posttrain").experiment_id
    stage_runs = {name: info["mlflow_run_id"] for name, info in record["stages"].items()}
    champion = client.get_model_version_by_alias("smoke", "champion")
    base = mlflow_ui(root)

    shots = Path(os.environ.get("POSTTRAIN_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,1700"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        def page(fragment: str, shot: str, *expected: str) -> str:
            # MLflow 3.17 picks its GenAI or model-training navigation from this parameter (or the
            # browser's last choice); the experiment's mlflow.experimentKind tag says the same.
            fragment += ("&" if "?" in fragment else "?") + "workflowType=machine_learning" if "workflowType" not in fragment else ""
            browser.get(base + fragment)
            try:
                text = WebDriverWait(browser, 60).until(
                    lambda driver: (body := driver.find_element(By.TAG_NAME, "body").text) and all(item in body for item in expected) and body
                )
            except TimeoutException:
                body = browser.find_element(By.TAG_NAME, "body").text
                raise AssertionError(f"{fragment}: not shown: {[item for item in expected if item not in body]}\n{body[:3000]}") from None
            time.sleep(1)  # let the charts finish drawing for the screenshot
            browser.save_screenshot(str(shots / f"{shot}.png"))
            return text

        # The experiment in MLflow's model-training view: the pipeline run is listed.
        page(f"#/experiments/{experiment}?workflowType=machine_learning", "1-experiment", "Runs", "smoke", "matching runs")
        # The pipeline run: its stages as child runs, the gate's decision.
        page(f"#/experiments/{experiment}/runs/{record['mlflow_parent_run_id']}", "2-pipeline-run", "Child runs", "posttrain.gate.decision", "promoted")
        # The SFT run: its store folder and links to the runs that built its inputs, the dataset it trained on.
        sft_page = page(
            f"#/experiments/{experiment}/runs/{stage_runs['sft']}", "3-sft-run",
            f"store folder {record['stages']['sft']['path']}", f"input base: run {stage_runs['base'][:8]}", f"input data: run {stage_runs['data'][:8]}",
            "instruction-train",
        )
        assert "eval_loss" in sft_page
        # The "input data" link leads to the data run, which lists its sources with their digests.
        link = browser.find_element(By.LINK_TEXT, f"run {stage_runs['data'][:8]}").get_attribute("href")
        assert link.endswith(f"#/experiments/{experiment}/runs/{stage_runs['data']}"), link
        data_manifest = json.loads((root / record["stages"]["data"]["path"] / "manifest.json").read_text())
        page(link.removeprefix(base), "4-data-run", f"store folder {record['stages']['data']['path']}", "instruction:0-instruction.jsonl", "rows_out")
        # The champion: a version of the registered model, pointing at the run that built it.
        model_page = page(f"#/models/smoke/versions/{champion.version}", "5-champion", "champion", "Source Run", "posttrain.store_path")
        assert record["stages"][{"student": "distill"}.get(record["gate"]["candidate"], record["gate"]["candidate"])]["path"] in model_page
        assert data_manifest["digest"]  # the data folder the chain started from is a published artifact
    finally:
        browser.quit()
    assert sorted(path.name for path in shots.glob("*.png")) == ["1-experiment.png", "2-pipeline-run.png", "3-sft-run.png", "4-data-run.png", "5-champion.png"]
