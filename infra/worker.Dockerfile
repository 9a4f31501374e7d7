# The GPU worker: this checkout, its locked dependencies, and the CUDA build of torch.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv git && rm -rf /var/lib/apt/lists/*
WORKDIR /posttrain
COPY . .
RUN python3.11 -m venv /venv && /venv/bin/pip install --no-cache-dir -c requirements.lock -e . bitsandbytes
ENV PATH=/venv/bin:$PATH POSTTRAIN_CHECKOUT=/posttrain
