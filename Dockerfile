# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t asft-api .     (no torch: FastAPI + SQLAlchemy only)
#   docker build --target worker -t asft-worker .  (CUDA torch, transformers, peft)
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ASFT_DATA_DIR=/data
RUN useradd --create-home --uid 10001 asft && mkdir -p /data && chown asft /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY asft_core ./asft_core
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations

FROM base AS api
RUN pip install --no-cache-dir .
USER asft
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Refuses to start on an old schema: run `asft db upgrade` first (a one-shot service).
CMD ["asft", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# The default torch wheel for Linux is the CUDA build, which is what GPU workers want.
RUN pip install --no-cache-dir ".[worker]"
USER asft
HEALTHCHECK --interval=60s --timeout=20s --retries=3 \
    CMD ["celery", "-A", "worker.celery_app", "inspect", "ping", "--timeout", "10"]
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--loglevel", "INFO", "--concurrency", "1"]
