"""A full disk during a model save: one line, the half-written folder gone, the store still valid, and
a run after space is freed reuses everything published before.

Two ways to fill the disk: a real one (a 256 KB tmpfs mounted over the store's `sft` folder, so the
SFT weights do not fit; needs root and mount rights, skipped elsewhere), and the same failure
injected in the save (posttrain.failpoints `sft:save:enospc`), which runs everywhere.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from posttrain.artifacts import Store
from tests.kill_harness import newest_record, run_cli


def _check_full_disk_failure(result: subprocess.CompletedProcess, root: Path) -> None:
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # the rest is progress
    assert len(lines) == 1, result.stderr
    assert "sft: no space left on device while writing" in lines[0] and str(root / "store" / "sft") in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    record = newest_record(root)
    assert record["status"] == "failed" and record["stages"]["sft"]["state"] == "failed"
    assert {record["stages"][name]["state"] for name in ("base", "benchmarks", "data")} == {"built"}
    assert not list((root / "store" / "sft").glob(".tmp-*")), "the half-written folder is removed (it would keep the disk full)"
    assert not Store(root).artifacts("sft")
    verify = run_cli(["verify", "--root", str(root)])
    assert verify.returncode == 0 and "3 of 3 artifacts match" in verify.stdout, verify.stdout + verify.stderr


def _check_rerun(root: Path, args: list[str], server: str) -> None:
    again = run_cli(args, env={"PREFECT_API_URL": server})
    assert again.returncode == 0, again.stderr[-3000:]
    record = newest_record(root)
    assert {record["stages"][name]["state"] for name in ("base", "benchmarks", "data")} == {"cached"}
    assert record["stages"]["sft"]["state"] == "built"


@pytest.mark.slow
def test_disk_full_in_the_save_injected(tmp_path, prefect_api):
    root = tmp_path / "root"
    args = ["run", "configs/smoke.yaml", "--set", f"store_root={root}", "--until", "sft"]
    _check_full_disk_failure(run_cli(args, failpoint="sft:save:enospc", env={"PREFECT_API_URL": prefect_api}), root)
    _check_rerun(root, args, prefect_api)


def _can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", "--version"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root")
def test_disk_full_in_the_save_on_a_real_small_disk(tmp_path, prefect_api):
    root = tmp_path / "root"
    small_disk = root / "store" / "sft"
    small_disk.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small_disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    args = ["run", "configs/smoke.yaml", "--set", f"store_root={root}", "--until", "sft"]
    try:
        _check_full_disk_failure(run_cli(args, env={"PREFECT_API_URL": prefect_api}), root)
    finally:
        subprocess.run(["umount", str(small_disk)], check=True)
    _check_rerun(root, args, prefect_api)
