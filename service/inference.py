"""Chat with models: which inference server serves a model id, under which name, and who may.

The API forwards chat completions to an inference server that speaks OpenAI's protocol plus
vLLM's runtime adapter calls: the embedded one (``asft infer``) or ``vllm serve --enable-lora``.
An adapter is served under its model id; the server loads it from the artifact store when it
first lacks it (after a restart, vLLM has forgotten every adapter it was given).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, FineTunedModel, Job, ModelPair, Team
from service.jobs.create import Refused
from service.jobs.state import fine_tuned_name
from service.settings import Settings
from service.storage import ArtifactStore, is_id

logger = logging.getLogger("asft.inference")
CHECKPOINT_MARK = ":ckpt-step-"


@dataclass(frozen=True)
class ChatTarget:
    """Where a model id's chat completions go."""

    url: str  # the inference server's root URL
    served_name: str  # the name that server serves the model under
    base: str  # the server's name of the base model (an adapter is loaded onto it)
    adapter_path: str | None  # an adapter's folder, for loading it when the server lacks it


def _pair_target(pair: ModelPair, settings: Settings) -> ChatTarget:
    base = pair.served_model or pair.aligned_model
    return ChatTarget((pair.inference_url or settings.inference_url).rstrip("/"), base, base, None)


def _adapter_target(pair: ModelPair, settings: Settings, name: str, folder: str) -> ChatTarget:
    pair_target = _pair_target(pair, settings)
    return ChatTarget(pair_target.url, name, pair_target.base, folder)


def _not_found(model_id: str) -> Refused:
    return Refused(
        "not_found", "model_not_found", f"The model `{model_id}` does not exist", "model"
    )


def _refuse_unapproved(team: Team, model_id: str, why: str) -> None:
    if not team.allow_unapproved_chat:
        raise Refused(
            "forbidden",
            "adapter_not_approved",
            f"{model_id} {why}; a team admin can allow trying such models (allow_unapproved_chat)",
            "model",
        )


def chat_target(
    session: Session, team: Team, model_id: str, store: ArtifactStore, settings: Settings
) -> ChatTarget:
    """The target of ``model_id``: a registered pair, a fine-tuned model or a checkpoint.

    Another team's model is not found. A fine-tuned model that failed the safety gate, and a
    checkpoint (never evaluated), are refused (``adapter_not_approved``) unless the team's
    ``allow_unapproved_chat`` is set.
    """
    pair = session.get(ModelPair, model_id)
    if pair is not None:
        return _pair_target(pair, settings)
    if CHECKPOINT_MARK in model_id:
        return _checkpoint_target(session, team, model_id, store, settings)
    tuned = session.get(FineTunedModel, model_id)
    if tuned is None or tuned.team_id != team.id:
        raise _not_found(model_id)
    if not tuned.approved:
        _refuse_unapproved(team, model_id, "failed the safety gate")
    folder = store.path(tuned.storage_key)
    if not (folder / "adapter_config.json").is_file():
        raise _not_found(model_id)
    pair = session.get(ModelPair, tuned.model)
    assert pair is not None  # a foreign key
    return _adapter_target(pair, settings, model_id, str(folder))


def _checkpoint_target(
    session: Session, team: Team, model_id: str, store: ArtifactStore, settings: Settings
) -> ChatTarget:
    name, _, step_text = model_id.rpartition(CHECKPOINT_MARK)
    job_id = "ftjob-" + name.rsplit(":", 1)[-1]
    # ASCII digits, within a 32-bit step ("²" is a digit to str.isdigit, and int() refuses it).
    step_ok = re.fullmatch(r"[0-9]{1,9}", step_text) is not None
    job = session.get(Job, job_id) if is_id(job_id) and step_ok else None
    if job is None or job.team_id != team.id or fine_tuned_name(job, team.name) != name:
        raise _not_found(model_id)
    checkpoint = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == int(step_text))
    ).first()
    folder = store.path(checkpoint.storage_key) / "adapter" if checkpoint else None
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise _not_found(model_id)
    _refuse_unapproved(team, model_id, "is a checkpoint the safety evaluation never saw")
    pair = session.get(ModelPair, job.model)
    assert pair is not None
    return _adapter_target(pair, settings, model_id, str(folder))


def load_request(target: ChatTarget) -> dict[str, str]:
    """The body of ``POST /v1/load_lora_adapter`` that gives the server ``target``'s adapter."""
    assert target.adapter_path is not None
    return {
        "lora_name": target.served_name,
        "lora_path": target.adapter_path,
        "base_model": target.base,
    }


def is_loaded_answer(response: httpx.Response) -> bool:
    """Whether a load call succeeded, or found the adapter already loaded (vLLM: a 400)."""
    return response.is_success or (
        response.status_code == 400 and "already been loaded" in response.text
    )


def register_adapter(target: ChatTarget, timeout_s: float = 30.0) -> bool:
    """Load an approved adapter on its server now, so its first chat needs no load.

    Best effort: an unreachable server is logged, not raised (the first chat loads it).
    """
    try:
        response = httpx.post(
            f"{target.url}/v1/load_lora_adapter", json=load_request(target), timeout=timeout_s
        )
    except httpx.HTTPError as error:
        logger.info("inference server %s not reached to register an adapter: %s", target.url, error)
        return False
    if not is_loaded_answer(response):
        logger.warning("inference server refused adapter %s: %s", target.served_name, response.text)
        return False
    return True
