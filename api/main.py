"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from api.routes import health


def create_app() -> FastAPI:
    """Build the app. Routes for files and fine-tuning jobs arrive with the API issue."""
    app = FastAPI(title="AsFT Service", version="0.1.0")
    app.include_router(health.router)
    return app
