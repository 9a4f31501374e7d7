"""Bad input at the edge, through the real CLI and flow: one line naming file/row/key/rule, a
non-zero exit, no training stage started, and everything already produced kept."""

import json
import os
import subprocess
import sys
from pathlib import Path

from posttrain.runs import find_run

REPO = Path(__file__).resolve().parents[2]


def run_cli(config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "posttrain.cli", "run", str(config)]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def write_config(tmp_path: Path, sources: str) -> Path:
    config = tmp_path / "bad.yaml"
    config.write_text(f"store_root: {tmp_path / 'root'}\ndata:\n  sources:\n{sources}\nsft: {{max_steps: 2}}\n")
    return config


def test_failed_contract_stops_before_training_and_keeps_finished_work(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) + "\n" for i in range(5)))
    config = write_config(tmp_path, f"    - {{role: instruction, generate: {{rows: 200}}}}\n    - {{role: preference, path: {pairs}}}")
    result = run_cli(config)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "data contract preference_clean" in line and "failed" in line
    assert "Traceback" not in result.stderr
    record = find_run(tmp_path / "root", "bad")
    assert record["status"] == "failed"
    assert record["stages"]["data"]["state"] == "failed"
    assert "sft" not in record["stages"]  # no training stage started
    assert record["stages"]["base"]["state"] == "built"
    assert (tmp_path / "root" / record["stages"]["base"]["path"] / "manifest.json").is_file()
    # The quarantine of the failed attempt is kept: the five pairs, each with its rule and row.
    [staging] = (tmp_path / "root" / "store" / "data").glob(".tmp-*")
    rejected = [json.loads(line) for line in (staging / "rejected.jsonl").read_text().splitlines()]
    assert [(r["rule"], r["source_row"]) for r in rejected if "pairs" in r["source"]] == [("same_pair", n) for n in range(1, 6)]
    assert "Traceback" in (tmp_path / "root" / "logs" / f"{record['run_id']}.log").read_text()  # the trace goes to the log


def test_bad_source_row_names_file_row_and_key(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    result = run_cli(write_config(tmp_path, f"    - {{role: instruction, path: {rows}}}\n    - {{role: preference, generate: {{rows: 50}}}}"))
    assert result.returncode == 1
    [line] = error_lines(result)
    assert f"{rows} row 2: missing key 'response'" in line
