"""Prometheus metrics of the API process (the worker adds its own in a later issue)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine, func, select

from api.db.models import Job
from api.jobs.state import STATUSES

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "asft_http_requests",
    "HTTP requests by route and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "asft_http_request_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    registry=REGISTRY,
)
JOBS = Gauge("asft_jobs", "Jobs by status", ["status"], registry=REGISTRY)


def refresh_job_gauges(engine: Engine) -> None:
    """Count jobs by status (at scrape time: the database is the truth)."""
    with engine.connect() as connection:
        counts = dict(
            connection.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        )
    for status in STATUSES:
        JOBS.labels(status).set(counts.get(status, 0))
