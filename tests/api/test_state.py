"""The job state machine: the allowed transitions, and conditional updates that move once."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.models import Job
from service.jobs.state import (
    ACTIVE,
    STATUSES,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    check_transition,
    transition,
)
from tests.api.conftest import auth


def test_the_lifecycle_is_the_documented_one() -> None:
    assert set(TRANSITIONS) == set(STATUSES)
    assert all(not TRANSITIONS[status] for status in TERMINAL)
    assert "queued" in TRANSITIONS["running"]  # a requeued job (worker died or stopping)
    assert {"validating_files", "queued", "running"} == ACTIVE
    for current, target in [
        ("succeeded", "running"),
        ("queued", "succeeded"),
        ("failed", "queued"),
    ]:
        with pytest.raises(IllegalTransition):
            check_transition(current, target)


def test_a_transition_moves_a_job_once(
    app: FastAPI, client: TestClient, team_key: str, training_file: str, model_pair: str
) -> None:
    job_id = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model_pair, "training_file": training_file},
        headers=auth(team_key),
    ).json()["id"]
    with app.state.sessions() as session, session.begin():
        assert transition(session, job_id, "validating_files", "queued") is True
        # A second delivery of the same message finds the job moved already.
        assert transition(session, job_id, "validating_files", "queued") is False
        with pytest.raises(IllegalTransition):
            transition(session, job_id, "queued", "succeeded")
        assert transition(session, job_id, "queued", "cancelled") is True
    with app.state.sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        assert job.status == "cancelled" and job.finished_at is not None
