"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import (
    MAX_HEADER_COUNT,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    RequestContextMiddleware,
)
from api.ratelimit import make_rate_limiter
from api.routes import admin, chat, files, health, jobs, models, ui
from service.db.session import engine_for, session_factory
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.storage import ArtifactStore

# JSON bodies are small; only uploads may be large (ASFT_MAX_UPLOAD_BYTES).
MAX_JSON_BODY_BYTES = 1 << 20

DESCRIPTION = """Fine-tuning jobs whose adapters stay safe (AsFT, arXiv 2506.08473).

OpenAI-shaped: upload a JSONL dataset to `/v1/files`, create a job at `/v1/fine_tuning/jobs`,
poll it, read its events, checkpoints and safety report, download the adapter, and chat
with the fine-tuned model at `/v1/chat/completions`. Every
request carries `Authorization: Bearer <team key>`; errors use the envelope
`{"error": {"message", "type", "param", "code"}}`.
"""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Everything loaded so far (modules, the app, its routes) lives as long as the process:
    # moved out of the collector's generations, full collections no longer walk it, which
    # paused a worker for tens of milliseconds (the list endpoints' p99).
    gc.collect()  # frozen garbage would never be freed
    gc.freeze()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (the process settings by default)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="AsFT Service", version="0.1.0", description=DESCRIPTION, lifespan=_lifespan
    )
    app.state.settings = settings
    app.state.engine = engine_for(settings.resolved_database_url)
    app.state.sessions = session_factory(app.state.engine)
    app.state.store = ArtifactStore(settings.resolved_artifact_dir)
    app.state.queue = make_celery(settings)
    app.state.rate_limiter = make_rate_limiter(settings)
    install_error_handlers(app)
    for module in (health, files, jobs, models, chat, admin, ui):
        app.include_router(module.router)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=MAX_JSON_BODY_BYTES,
        upload_limit=settings.max_upload_bytes,
        upload_paths={"/v1/files"},
    )
    # Outermost: a request with oversized headers is refused before anything reads them.
    app.add_middleware(
        HeaderLimitMiddleware,
        max_header_bytes=settings.max_header_bytes,
        max_header_count=MAX_HEADER_COUNT,
    )
    return app
