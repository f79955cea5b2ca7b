# syntax=docker/dockerfile:1
# Two images from one file, both running as uid 10001 with their state under /data:
#   docker build --target api    -t asft-api .     the API, migrations and Celery beat; no torch
#   docker build --target worker -t asft-worker .  the GPU worker: CUDA torch, transformers, peft
# Nothing secret is set or copied here (.dockerignore keeps .env out): the database, the
# broker and the admin key arrive through the environment at run time (docker-compose.yml).

# ---- build stages: each fills its own virtual environment, copied whole into the runtime
# image below, so pip's caches and the source tree stay out of the final images.
FROM python:3.11.9-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY asft_core ./asft_core
COPY asft_client ./asft_client
COPY asft ./asft
COPY api ./api
COPY service ./service
COPY worker ./worker
COPY inference ./inference

FROM build AS api-build
# The base install is what the API needs; pyproject.toml keeps torch out of it.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /src

FROM build AS worker-build
# The torch the test suite runs (constraints-cpu.txt pins it); on Linux x86_64 the default
# wheel of that version is the CUDA build, with the CUDA runtime as pip packages, so the
# image needs no CUDA base: the host's NVIDIA driver is all a GPU worker needs.
ARG TORCH_VERSION=2.13.0
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir "/src[worker]"

# ---- runtime: the same Python as the build stages, so the copied environments work as is.
FROM python:3.11.9-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ASFT_DATA_DIR=/data
# /data is created owned by the service user, so a fresh named volume mounted there
# inherits that owner and the non-root processes can write to it.
RUN groupadd --gid 10001 asft \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin asft \
    && mkdir /data \
    && chown 10001:10001 /data
WORKDIR /app
# `asft db upgrade` and the API's schema check look for Alembic's scripts in the working
# directory when the package is installed (not run from a checkout).
COPY migrations ./migrations

FROM runtime AS api
COPY --from=api-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Refuses to start on an old schema: `asft db upgrade` runs first (compose's migrate service).
CMD ["asft", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS worker
COPY --from=worker-build /opt/venv /opt/venv
# Models named by hub id are downloaded onto the data volume, not into the container's layer.
ENV HF_HOME=/data/cache/huggingface
USER 10001:10001
# `celery inspect ping` cannot be the check: the worker runs jobs in its main process (solo
# pool) and answers no pings while it trains. The process itself is PID 1 (its exit ends
# the container), so the check is what it needs to get work: the broker answers.
HEALTHCHECK --interval=60s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "-c", "from worker.celery_app import app; app.connection_for_write().ensure_connection(max_retries=1, timeout=10)"]
# SIGTERM (docker stop) checkpoints the running job and requeues it: give it time to finish
# the current step (docker-compose.yml sets stop_grace_period).
CMD ["asft", "worker"]
