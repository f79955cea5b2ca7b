"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.metrics import REGISTRY, WORKER_GAUGES, refresh_job_gauges
from service.db.migrate import schema_status
from service.supervision import children_down, status_path

router = APIRouter(tags=["health"])
logger = logging.getLogger("asft.api")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving requests."""
    return {"status": "ok"}


def _check_database(request: Request) -> str | None:
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        status = schema_status(request.app.state.engine)
    except Exception as error:  # any driver error means "not ready"
        logger.warning("readiness: database unreachable: %s", error)
        return f"database unreachable ({type(error).__name__})"
    return None if status.ok else status.message


def _check_broker(request: Request) -> str | None:
    try:
        with request.app.state.queue.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as error:
        logger.warning("readiness: broker unreachable: %s", error)
        return f"broker unreachable ({type(error).__name__})"
    return None


def _check_supervised(request: Request) -> str | None:
    """Under ``asft serve``: a child it is restarting (the worker, the inference engine)."""
    down = children_down(status_path(request.app.state.settings.data_dir))
    if not down:
        return None
    return "; ".join(
        f"{name} down ({child.get('last_exit', 'not started')}), restarting"
        for name, child in sorted(down.items())
    )


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "The database or broker is unreachable, the schema is old, or "
            "asft serve is restarting a process it supervises."
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers at the current schema, the broker is reachable and
    (under ``asft serve``) the worker and the inference engine run."""
    checks = {
        "database": await run_in_threadpool(_check_database, request),
        "broker": await run_in_threadpool(_check_broker, request),
    }
    supervised = _check_supervised(request)
    if supervised is not None:  # named only while asft serve restarts something
        checks["supervised"] = supervised
    ready = all(problem is None for problem in checks.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latencies, jobs by status."""
    try:
        refresh_job_gauges(request.app.state.engine)
    except SQLAlchemyError:
        # Database down or not migrated yet (/readyz says which): the request metrics must
        # stay scrapeable, and job counts we cannot read are left out rather than shown stale.
        for gauge in WORKER_GAUGES:
            gauge.clear()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
