# syntax=docker/dockerfile:1
#
# The worker image: the Prefect Kubernetes worker of pool `noisescore-gpu` and, with the
# same image, the flow-run Jobs it creates (torch, onnxruntime-gpu, the clean-labels flow).
# Build context = repository root:
#   docker build -f deploy/docker/worker.Dockerfile \
#       -t ghcr.io/noisescore/noisescore-worker:0.1.0 .
#
# CUDA base: 13.0. torch 2.14.1's PyPI wheel is built for CUDA 13.0 (it depends on
# nvidia-cuda-runtime 13.0.x, nvidia-cublas 13.x, nvidia-cudnn-cu13 9.x), and
# onnxruntime-gpu 1.31.1's PyPI wheel is built for CUDA 13.0 as well
# (capi/build_and_package_info.py: cuda_version = '13.0'; its CUDA provider links
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10). 13.0.2 is the
# patch release whose cudart (13.0.96) is the one torch pins. Nodes need an NVIDIA driver
# >= 580 (CUDA 13.0).
#
# Python: Ubuntu 24.04 ships 3.12 only; the builder installs a relocatable CPython 3.11
# (python-build-standalone, via uv) at /opt/python and the venv at /opt/venv; both are
# copied to the same paths in the runtime stage, so the venv's interpreter link resolves.

# ----------------------------------------------------------------------------- uv
FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

# ----------------------------------------------------------------------------- builder
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS builder

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_MANAGED_PYTHON=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN uv python install 3.11 \
    && uv venv --python 3.11 /opt/venv

# What setuptools needs to build the package (see service.Dockerfile).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY noisescore/ noisescore/
COPY ml/ ml/
COPY flows/ flows/
COPY service/ service/

# train: torch & co.; gpu: onnxruntime-gpu (the ONNX parity check on the GPU); k8s: the
# Prefect Kubernetes worker. Non-editable; the source stays in this stage.
RUN uv pip install --python /opt/venv/bin/python --no-cache "/src[train,gpu,k8s]"

# ----------------------------------------------------------------------------- runtime
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="noisescore-worker" \
      org.opencontainers.image.description="noisescore Prefect worker and clean-labels flow runs (CUDA 13.0, torch, onnxruntime-gpu)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/noisescore/noisescore" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="noisescore"

RUN groupadd --gid 10001 noisescore \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home \
       --home-dir /home/noisescore --shell /usr/sbin/nologin noisescore

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
# Our license and the notices of what the image contains (THIRD_PARTY_NOTICES.md).
COPY LICENSE THIRD_PARTY_NOTICES.md /usr/share/doc/noisescore/

# The `gpu` deployment's pull step sets the working directory to /app and loads its
# entrypoint flows/clean_labels.py:clean_labels from there; prefect.yaml lets
# `prefect deploy` run inside the image (the laptop stack does). The package itself is
# imported from the venv.
WORKDIR /app
COPY prefect.yaml ./
COPY flows/ flows/

# LD_LIBRARY_PATH: the runtime image has CUDA's math libraries but no cuDNN; torch brings
# cuDNN 9 for CUDA 13 (nvidia-cudnn-cu13) in the venv, and this makes onnxruntime's CUDA
# provider find the same library whether or not torch was imported first. The last two
# entries are the base image's own value (driver libraries of older container runtimes).
# Caches (torch hub, Hugging Face, matplotlib) and Prefect's home go to /tmp: the root
# filesystem is read-only in the cluster.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/noisescore \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NOISESCORE_STORE_DIR=/tmp/noisescore/artifacts

# `prefect worker start --with-healthcheck` serves GET /health here.
EXPOSE 8080

USER 10001:10001

# The image runs either the worker (the default command) or a flow-run Job. The check is
# the worker's own HTTP health (urllib: no curl in the image). Kubernetes ignores image
# HEALTHCHECKs (the chart's probes check the worker), so flow-run Job pods are unaffected;
# only a flow run started with plain `docker run` would show as unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PREFECT_WORKER_WEBSERVER_PORT', '8080') + '/health', timeout=4)"]

# No entrypoint (the CUDA base's nvidia_entrypoint.sh is dropped): the Kubernetes job
# template passes the flow-run command as the container's args, which must be the whole
# command line.
ENTRYPOINT []
CMD ["prefect", "worker", "start", "--pool", "noisescore-gpu", "--type", "kubernetes", "--with-healthcheck"]
