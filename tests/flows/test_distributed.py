"""SFT as DDP over two CPU processes (torch.distributed.run, gloo on 127.0.0.1): the same global batch
and the same training as in one process, one artifact written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kill_harness import newest_record, run_cli


@pytest.mark.slow
def test_sft_over_two_cpu_processes_trains_what_one_process_trains(tmp_path, prefect_api):
    server = {"PREFECT_API_URL": prefect_api}
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(["run", "configs/smoke.yaml", "--set", f"store_root={one}", "--until", "sft"], env=server)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(
        ["run", "configs/smoke.yaml", "--set", f"store_root={two}", "--until", "sft",
         "--set", "sft.launcher.kind=distributed", "--set", "sft.launcher.processes=2"],
        env=server,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    alone, spread = newest_record(one)["stages"]["sft"], newest_record(two)["stages"]["sft"]
    assert alone["fingerprint"] == spread["fingerprint"]  # how a stage is launched is not in its key
    manifest = json.loads((two / spread["path"] / "manifest.json").read_text())
    metrics = manifest["metrics"]
    # smoke: batch_size 16, no accumulation -> 16 rows a step on one device, 2 x 8 on two
    assert metrics["devices"] == 2 and metrics["global_batch"] == 16 and metrics["optimizer_steps"] == 8
    assert json.loads((one / alone["path"] / "manifest.json").read_text())["metrics"]["devices"] == 1
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    # The same rows in the same order (split_batches), gradients averaged over the two halves: the
    # same training up to float rounding (on the developers' box, byte-identical weights).
    assert abs(metrics["eval_loss"] - alone["metrics"]["eval_loss"]) < 1e-4
    losses = [json.loads(path.read_text()) for path in (one / alone["path"] / "loss_history.json", two / spread["path"] / "loss_history.json")]
    assert [entry["step"] for entry in losses[0]] == [entry["step"] for entry in losses[1]]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(*losses))
    assert sorted(path.name for path in Path(two / spread["path"]).glob("*.safetensors")) == ["model.safetensors"]
