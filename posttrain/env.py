"""Process environment defaults: offline, quiet, no telemetry. Set before the libraries are imported.

Every default uses setdefault, so a user's own environment wins (e.g. MLFLOW_TRACKING_URI or
PREFECT_API_URL pointing at real servers).
"""

from __future__ import annotations

import os

QUIET_OFFLINE_DEFAULTS = {
    # No telemetry or analytics calls (Prefect, MLflow, GX, HF).
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # the value 1 is ignored (FIELD_NOTES)
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # A fresh Prefect home migrates its database on first start; the default 20 s is too short on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # A tracking server that is down: MLflow's own defaults (7 retries, backoff factor 2) wait about
    # four minutes before the first error; 4 retries at factor 1 give a restarting server ~15 s.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # Progress bars of datasets/transformers would interleave with our own progress lines.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",  # TRL draws its own bars (e.g. DPO reference log-probs) regardless of disable_tqdm
    # Two spinning OpenMP threads on a busy 2-core machine collapse throughput (FIELD_NOTES).
    "OMP_WAIT_POLICY": "PASSIVE",
}


def configure_environment() -> None:
    for key, value in QUIET_OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
