"""The baseline of ``bench/api_load.py``: a bare FastAPI app that answers every GET with one
constant JSON object shaped and sized like a fine-tuning job.

It has no middleware, no database, no authentication and no response model, so what it serves
per second, and the CPU it spends per request, are the floor that uvicorn and FastAPI set on
these server settings: the bench shows it as a reference row beside the API's. The route is
``async``, the cheapest way FastAPI serves a request (no thread-pool hop).

    uvicorn --factory bench.bare_app:create_app --workers 2 ...
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

# What GET /v1/fine_tuning/jobs/{id} answers for an asft job, with made-up ids: about the same
# keys, nesting and size (about 1.1 kB), so JSON encoding costs the same order of work.
JOB_LIKE: dict[str, Any] = {
    "object": "fine_tuning.job",
    "id": "ftjob-BARExBAREyBAREyBAREyBARE",
    "model": "tiny-chat",
    "created_at": 1764000000,
    "finished_at": None,
    "fine_tuned_model": None,
    "organization_id": "team-BARExBAREyBAREyBAREyBARE",
    "result_files": [],
    "status": "running",
    "validation_file": None,
    "training_file": "file-BARExBAREyBAREyBAREyBARE",
    "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
    "trained_tokens": 123456,
    "error": None,
    "user_provided_suffix": None,
    "seed": 1234567,
    "estimated_finish": 1764003600,
    "integrations": [],
    "metadata": {"bench": "api_load", "index": "0"},
    "method": {
        "type": "asft",
        "asft": {
            "hyperparameters": {
                "n_epochs": 3,
                "batch_size": 8,
                "learning_rate_multiplier": 1.0,
                "learning_rate": 5e-05,
                "rank": 8,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": ["q_proj", "v_proj"],
                "max_seq_len": 512,
                "gradient_accumulation_steps": 1,
                "warmup_steps": 0,
                "lambda": 1.0,
                "penalty_rank": None,
            }
        },
    },
    "evaluation": None,
    "safety": None,
    "validation": {
        "training_examples": 200,
        "validation_examples": None,
        "warnings": [],
        "training_tokens": 51200,
        "validation_tokens": None,
        "truncated_lines": [],
        "total_steps": 75,
        "estimated_tokens": 153600,
    },
}


def create_app() -> FastAPI:
    """The bare app: every GET path answers ``JOB_LIKE`` (so the bench's URLs work unchanged)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/{path:path}")
    async def constant(path: str) -> dict[str, Any]:
        return JOB_LIKE

    return app
