"""``/v1/models``: registered model pairs (admin registers) and the team's fine-tuned models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import AdminDep, CurrentTeam, SessionDep, StoreDep
from api.errors import Conflict, NotFound, Unprocessable
from api.schemas.common import PLAIN_TEXT, Page, errors
from api.schemas.models import ModelDeleted, ModelObject, ModelPairCreate
from service.db.models import AlignmentArtifactRow, Checkpoint, FineTunedModel, ModelPair
from service.storage import job_key

router = APIRouter(prefix="/v1/models", tags=["models"])
# A model id with control characters names no model (and a NUL would make PostgreSQL fail).
_NAMEABLE = re.compile(PLAIN_TEXT)


# What GET /v1/models shows of a pair's alignment direction (from its latest artifact).
ALIGNMENT_FACTS = ("regime", "max_top_eigenvalue", "degenerate", "modules")


def alignment_facts(session: Session, pair_id: str) -> dict[str, Any] | None:
    """The pair's alignment regime and spectrum once a job has computed its direction."""
    summary = session.scalar(
        select(AlignmentArtifactRow.summary)
        .where(AlignmentArtifactRow.model_pair == pair_id)
        .order_by(AlignmentArtifactRow.created_at.desc())
        .limit(1)
    )
    return {key: summary.get(key) for key in ALIGNMENT_FACTS} if summary else None


def pair_object(pair: ModelPair, alignment: dict[str, Any] | None = None) -> ModelObject:
    """The API shape of a registered pair."""
    return ModelObject(
        alignment=alignment,
        id=pair.id,
        created=pair.created_at,
        owned_by="system",
        kind="model_pair",
        base_model=pair.base_model,
        aligned_model=pair.aligned_model,
        inference_url=pair.inference_url,
    )


def fine_tuned_object(model: FineTunedModel) -> ModelObject:
    """The API shape of a fine-tuned model."""
    return ModelObject(
        id=model.id,
        created=model.created_at,
        owned_by=model.team_id,
        kind="fine_tuned",
        parent=model.model,
        job_id=model.job_id,
        approved=model.approved,
        sha256=model.sha256,
    )


@router.get("", response_model=Page[ModelObject], responses=errors())
def list_models(team: CurrentTeam, session: SessionDep) -> Page[ModelObject]:
    """Registered model pairs, then the team's fine-tuned models."""
    data = [
        pair_object(p, alignment_facts(session, p.id))
        for p in session.scalars(select(ModelPair).order_by(ModelPair.id))
    ]
    tuned = session.scalars(
        select(FineTunedModel)
        .where(FineTunedModel.team_id == team.id)
        .order_by(FineTunedModel.created_at.desc())
    )
    data += [fine_tuned_object(m) for m in tuned]
    return Page(data=data, has_more=False)


@router.get("/{model_id}", response_model=ModelObject, responses=errors(404))
def get_model(team: CurrentTeam, session: SessionDep, model_id: str) -> ModelObject:
    """A registered pair, or one of the team's fine-tuned models."""
    if not _NAMEABLE.match(model_id):
        raise NotFound("model_not_found", f"no model {model_id!r}", "model")
    pair = session.get(ModelPair, model_id)
    if pair is not None:
        return pair_object(pair, alignment_facts(session, pair.id))
    tuned = session.get(FineTunedModel, model_id)
    if tuned is None or tuned.team_id != team.id:
        raise NotFound("model_not_found", f"no model {model_id!r}", "model")
    return fine_tuned_object(tuned)


def _expanded(value: str) -> Path:
    """``value`` as a path with ``~`` expanded (unexpanded when it names no user)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~nosuchuser/...": no home directory to expand to
        return Path(value)


def _check_reference(value: str, param: str) -> str:
    """The model reference to store: an existing folder as an absolute path, else a hub id.

    Folders are resolved here because the worker runs in another process (often another
    working directory) and model loaders do not expand ``~``.
    """
    folder = _expanded(value)
    if folder.is_dir():
        return str(folder.resolve())
    if value.startswith(("/", ".", "~")) or value.count("/") != 1:
        raise Unprocessable(
            "model_path_not_found",
            f"{value!r} is neither an existing folder nor a hub id (owner/name)",
            param,
        )
    return value


@router.post(
    "",
    response_model=ModelObject,
    dependencies=[AdminDep],
    responses=errors(409, 413),
    summary="Register a base/aligned model pair (admin)",
)
def register_model(session: SessionDep, body: ModelPairCreate) -> ModelObject:
    """Register a pair: the aligned model is fine-tuned, the base gives the alignment direction."""
    if session.get(ModelPair, body.id) is not None:
        raise Conflict("model_exists", f"model {body.id!r} is already registered", "id")
    aligned_model = _check_reference(body.aligned_model, "aligned_model")
    base_model = _check_reference(body.base_model, "base_model")
    eval_suite = None
    if body.eval_suite is not None:
        suite = _expanded(body.eval_suite)
        if not suite.is_file():
            message = f"eval_suite {body.eval_suite!r} is not a file"
            raise Unprocessable("eval_suite_not_found", message, "eval_suite")
        eval_suite = str(suite.resolve())  # read by the worker, from its own directory
    pair = ModelPair(
        id=body.id,
        aligned_model=aligned_model,
        base_model=base_model,
        eval_suite=eval_suite,
        inference_url=body.inference_url.rstrip("/") if body.inference_url else None,
        served_model=body.served_model,
    )
    session.add(pair)
    session.flush()
    return pair_object(pair)


@router.delete("/{model_id}", response_model=ModelDeleted, responses=errors(404))
def delete_model(
    team: CurrentTeam, session: SessionDep, store: StoreDep, model_id: str
) -> ModelDeleted:
    """Delete one of the team's fine-tuned models: its adapter and its job's checkpoints."""
    tuned = session.get(FineTunedModel, model_id) if _NAMEABLE.match(model_id) else None
    if tuned is None or tuned.team_id != team.id:
        raise NotFound("model_not_found", f"no fine-tuned model {model_id!r}", "model")
    job_id = tuned.job_id
    for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)):
        session.delete(checkpoint)
    session.delete(tuned)
    session.commit()  # rows first: a failed commit must not leave rows without files
    store.delete(job_key(job_id))
    return ModelDeleted(id=model_id)
