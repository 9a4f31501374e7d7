"""One stage as its own flow run, on a worker of another machine's pool (`<stage>.launcher.kind: deployment`).

    posttrain worker --pool gpu          # on the GPU machine: serves this flow (and scheduled runs)
    sft: {launcher: {kind: deployment, pool: gpu}}    # in the pipeline's config, with shared_store set

The pipeline's flow starts this flow run on the pool and waits for it. The worker opens its own
local store (POSTTRAIN_WORKER_STORE, default `posttrain-store/` in the worker's folder) on the
same `shared_store`, pulls the stage's inputs from it, builds the stage under the fingerprint the
pipeline computed, and publishes: locally, then to the shared store (manifest last), where the
pipeline finds it. The manifest's `built_by` and `git` name the worker's host, process and commit.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from posttrain import config as config_module
from posttrain.fingerprint import StageKey
from posttrain.remote import open_store
from posttrain.runner import execute_stage

WORKER_STORE_ENV = "POSTTRAIN_WORKER_STORE"


@flow(name="posttrain-stage", persist_result=False)
def stage_flow(
    stage: str, module: str, section_class: str, section: dict, inputs: dict[str, str], key: dict, shared_store: str,
    shared_store_options: dict, seed: int, threads: int, device: str, run_id: str, force: bool = False,
) -> dict:
    """`inputs`: input name -> store path of a published artifact (relative to a store root);
    `key`: the pipeline's StageKey ({fingerprint, parts})."""
    store = open_store(Path(os.environ.get(WORKER_STORE_ENV, "posttrain-store")).resolve(), shared_store, shared_store_options)
    artifacts = {}
    for name, relative in inputs.items():
        input_stage, fingerprint = Path(relative).parent.name, Path(relative).name
        found = store.lookup(input_stage, fingerprint)
        if found is None:
            raise RuntimeError(f"{stage}: input {name} ({relative}) is not in the shared store {shared_store}")
        artifacts[name] = found
    section_object = getattr(config_module, section_class).model_validate(section)
    outcome = execute_stage(
        stage, module, section_object, artifacts, store, seed, None, threads, device, run_id, StageKey(key["fingerprint"], key["parts"]), force
    )
    return {"path": outcome.artifact.manifest["path"], "digest": outcome.artifact.digest, "cache_hit": outcome.cache_hit, "seconds": outcome.seconds}
