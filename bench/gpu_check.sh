#!/usr/bin/env bash
# The training stages once on a GPU machine, without Prefect or MLflow (bench/gpu_check.py train).
#
# Prepare here, on a machine with the full stack (the GPU image lacks Great Expectations, Prefect,
# MLflow, TRL, datasets, bitsandbytes and pydantic):
#
#   .venv/bin/python bench/gpu_check.py prepare configs/demo.yaml --store gpu_store   # base, benchmarks, data
#   printf '/.whl/\n/gpu_store/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 peft==0.21.2   # ≈ 48 MB
#
# then on the GPU machine, from the repo root, carrying .whl and gpu_store:
#
#   bash bench/gpu_check.sh [configs/demo.yaml]
#
# Environment: OUT (report folder; default /tmp/gpu_check), STORE (default gpu_store), PROBE_STEPS
# (LoRA/QLoRA probe steps, 0 = none; default 500), DEADLINE (no probes after this many seconds;
# default 240), PYTHON (default python3), NO_WHEELS=1 (use the interpreter's own packages),
# SFT_BENCH=0 (skip bench/gpu_sft.py, the Qwen2-0.5B-shaped throughput bench that runs after the stages).
# Writes $OUT/gpu_check.log, $OUT/gpu_check.json and $OUT/gpu_check.md, and $OUT/gpu_sft.json.
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/demo.yaml}
OUT=${OUT:-/tmp/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  nvidia-smi || echo "nvidia-smi: not available"
  if [ "${NO_WHEELS:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PYTHON" - <<'EOF'
from importlib import metadata
names = "torch transformers accelerate peft trl datasets bitsandbytes pydantic tokenizers safetensors huggingface_hub pyarrow fsspec pandas numpy".split()
print("versions:", ", ".join(f"{n} {metadata.version(n) if n else ''}" for n in names))
EOF
  "$PYTHON" bench/gpu_check.py train "$CONFIG" --store "${STORE:-gpu_store}" --out "$OUT/gpu_check.json" \
    --probe-steps "${PROBE_STEPS:-500}" --deadline "${DEADLINE:-240}"
  status=$?
  if [ "${SFT_BENCH:-1}" != 0 ]; then
    "$PYTHON" bench/gpu_sft.py --out "$OUT/gpu_sft.json" || status=1
  fi
  exit $status
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
