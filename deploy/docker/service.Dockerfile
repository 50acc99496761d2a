# syntax=docker/dockerfile:1
#
# The gRPC service image: `noisescore serve` with onnxruntime (CPU) and no torch.
# Build context = repository root:
#   docker build -f deploy/docker/service.Dockerfile \
#       -t ghcr.io/noisescore/noisescore-service:0.1.0 .
#
# Writable paths at run time are all under /tmp (the store fallback, Prefect's home), so the
# container runs with a read-only root filesystem and an emptyDir (or tmpfs) at /tmp.

# ----------------------------------------------------------------------------- builder
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

# What setuptools needs to build the package: pyproject.toml, the readme it declares and
# the four source folders that [tool.setuptools.package-dir] maps into `noisescore`.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY noisescore/ noisescore/
COPY ml/ ml/
COPY flows/ flows/
COPY service/ service/

# Non-editable: the venv holds the package, the source stays in this stage.
RUN /opt/venv/bin/pip install --no-cache-dir "/src[cpu]"

# ----------------------------------------------------------------------------- runtime
# Same base as the builder, so the venv's interpreter symlink resolves; no compilers, no
# pip extras beyond `cpu`.
FROM python:3.11-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="noisescore-service" \
      org.opencontainers.image.description="gRPC service noisescore.v1.NoiseScoring: label-noise scores and ONNX inference (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/noisescore/noisescore" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="noisescore"

RUN groupadd --gid 10001 noisescore \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home \
       --home-dir /home/noisescore --shell /usr/sbin/nologin noisescore

COPY --from=builder /opt/venv /opt/venv
# Our license and the notices of what the image contains (THIRD_PARTY_NOTICES.md).
COPY LICENSE THIRD_PARTY_NOTICES.md /usr/share/doc/noisescore/

WORKDIR /app

# The image has no torch, so jobs can only run as Prefect flow runs (a worker image does
# the training): NOISESCORE_JOB_RUNNER=prefect instead of `auto`, which would fall back to
# local child processes when PREFECT_API_URL is missing.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/noisescore \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    NOISESCORE_GRPC_ADDR=0.0.0.0:50051 \
    NOISESCORE_METRICS_ADDR=0.0.0.0:9464 \
    NOISESCORE_HEALTH_ADDR=0.0.0.0:8081 \
    NOISESCORE_STORE_DIR=/tmp/noisescore/artifacts \
    NOISESCORE_JOB_RUNNER=prefect

# gRPC API (TLS when configured), Prometheus /metrics, plaintext grpc.health.v1 for probes.
EXPOSE 50051 9464 8081

USER 10001:10001

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "noisescore.healthcheck"]

ENTRYPOINT ["noisescore"]
CMD ["serve"]
