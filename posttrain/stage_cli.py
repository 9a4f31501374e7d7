"""Entry point shared by `python -m tasks.<stage>`: run one stage as its own process.

    python -m tasks.sft --config sft.json --inputs inputs.json --out /path/to/staging
    accelerate launch -m tasks.sft --config ...        # the same, on several GPUs (DDP)
    python -m torch.distributed.run --nproc_per_node 2 -m tasks.sft ...   # DDP on CPUs (gloo)

`--config` is the stage's section as JSON, `--inputs` maps input names to published artifact
folders (or to {"path", "manifest"} objects, as posttrain.runner passes them). The stage writes into `--out`; its draft manifest goes to `--out/_draft.json` for the
parent process (posttrain.runner) to publish. Only the main process (rank 0) writes the draft.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from posttrain.artifacts import Artifact


def _input_artifact(spec) -> Artifact:
    """An input is a published folder path, or {"path", "manifest"} as posttrain.runner writes it."""
    if isinstance(spec, str):
        return Artifact.load(Path(spec))
    return Artifact(Path(spec["path"]), spec["manifest"])


def main(run, section_class) -> None:
    parser = argparse.ArgumentParser(description="Run one posttrain stage in its own process.")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--inputs", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("POSTTRAIN_THREADS", "1")))
    section = section_class.model_validate(json.loads(args.config.read_text()))
    inputs = {name: _input_artifact(spec) for name, spec in json.loads(args.inputs.read_text()).items()}
    rank = int(os.environ.get("RANK", "0"))
    # Under DDP every rank runs the stage; only rank 0 writes the artifact. The others write their
    # copies (contract results, the model they also hold) into a scratch folder, removed after.
    out = args.out if rank == 0 else Path(tempfile.mkdtemp(prefix=f"posttrain-rank{rank}-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        draft = run(section, inputs, out)
    finally:
        if rank != 0:
            shutil.rmtree(out, ignore_errors=True)
    if rank == 0:
        (args.out / "_draft.json").write_text(json.dumps(draft.manifest, default=str))
    sys.exit(0)
