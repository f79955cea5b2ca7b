"""Prometheus metrics: the API's requests, and the workers' state read from the database.

Workers run in other processes, often on other hosts; what they do is in the database (the
truth), so queue depth, job durations and training throughput are computed at scrape time
rather than pushed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine, func, select

from service.db.models import Job, JobEvent
from service.jobs.state import STATUSES

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
QUEUE_DEPTH = Gauge(
    "asft_queue_depth", "Jobs waiting for a worker (validating_files or queued)", registry=REGISTRY
)
DURATION = Gauge(
    "asft_job_duration_seconds",
    "Run time (start to finish) of the last 100 finished jobs",
    ["quantile"],
    registry=REGISTRY,
)
THROUGHPUT = Gauge(
    "asft_training_tokens_per_second",
    "Sum over running jobs of the tokens/s of their latest step",
    registry=REGISTRY,
)
WORKER_GAUGES = (JOBS, QUEUE_DEPTH, DURATION, THROUGHPUT)


def refresh_job_gauges(engine: Engine) -> None:
    """Jobs by status, queue depth, durations and throughput, read from the database."""
    with engine.connect() as connection:
        counts = dict(
            connection.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        )
        durations = sorted(
            (finished or 0) - (started or 0)
            for started, finished in connection.execute(
                select(Job.started_at, Job.finished_at)
                .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .order_by(Job.finished_at.desc())
                .limit(100)
            ).all()
        )
        running = connection.execute(select(Job.id).where(Job.status == "running")).scalars()
        throughput = 0.0
        for job_id in running.all():
            data = connection.execute(
                select(JobEvent.data)
                .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
                .order_by(JobEvent.seq.desc())
                .limit(1)
            ).scalar()
            throughput += float((data or {}).get("tokens_per_s", 0.0))
    for status in STATUSES:
        JOBS.labels(status).set(counts.get(status, 0))
    QUEUE_DEPTH.set(counts.get("queued", 0) + counts.get("validating_files", 0))
    for quantile in (0.5, 0.9, 0.99):
        value = (
            durations[min(len(durations) - 1, int(quantile * len(durations)))] if durations else 0
        )
        DURATION.labels(str(quantile)).set(value)
    THROUGHPUT.set(throughput)
