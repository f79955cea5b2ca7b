"""The official ``openai`` Python package, pointed at a real uvicorn server of the service:
files, jobs, events, checkpoints and cancel work through it, and our errors reach it as its
typed exceptions with our codes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.db.models import Checkpoint, new_id
from service.jobs.state import transition
from service.storage import job_key
from tests.api.conftest import jsonl, sentiment_rows

STARTUP_TIMEOUT_S = 15.0


@pytest.fixture
def base_url(app: FastAPI, client: TestClient) -> Iterator[str]:
    """The app served by uvicorn on a free local port, in a background thread.

    ``client`` is requested so the fixtures that use it (teams, model pairs) share the app.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    # Serving on the socket bound above: no window in which another process takes the port.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            pytest.fail(f"uvicorn did not answer /healthz within {STARTUP_TIMEOUT_S} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def sdk(base_url: str, team_key: str) -> Iterator[openai.OpenAI]:
    """An OpenAI client on the service as team alpha; no retries, so errors show at once."""
    with openai.OpenAI(base_url=base_url, api_key=team_key, max_retries=0, timeout=30) as client:
        yield client


def as_dict(item: Any) -> dict[str, Any]:
    """The fields the server sent, our extra ones included."""
    data: dict[str, Any] = item.model_dump()
    return data


def test_files_through_the_sdk(sdk: openai.OpenAI) -> None:
    content = jsonl(sentiment_rows(12))
    uploaded = sdk.files.create(
        file=("train.jsonl", content, "application/jsonl"), purpose="fine-tune"
    )
    assert uploaded.id.startswith("file-")
    assert uploaded.object == "file"
    assert uploaded.bytes == len(content)
    assert uploaded.filename == "train.jsonl"
    assert uploaded.purpose == "fine-tune"
    assert uploaded.status == "processed"
    assert isinstance(uploaded.created_at, int)
    assert as_dict(uploaded)["num_examples"] == 12

    second = sdk.files.create(
        file=("more.jsonl", jsonl(sentiment_rows(11, start=50))), purpose="fine-tune"
    )
    listed = list(sdk.files.list())
    assert {item.id for item in listed} == {uploaded.id, second.id}
    assert all(isinstance(item.created_at, int) for item in listed)

    fetched = sdk.files.retrieve(uploaded.id)
    assert fetched.id == uploaded.id
    assert fetched.bytes == len(content)
    assert sdk.files.content(uploaded.id).content == content

    with pytest.raises(openai.NotFoundError) as raised:
        sdk.files.retrieve("file-doesnotexist")
    assert raised.value.status_code == 404
    assert raised.value.code == "file_not_found"


def test_jobs_events_checkpoints_and_cancel_through_the_sdk(
    sdk: openai.OpenAI, model_pair: str, app: FastAPI, client: TestClient
) -> None:
    training = sdk.files.create(
        file=("train.jsonl", jsonl(sentiment_rows(20))), purpose="fine-tune"
    )
    job = sdk.fine_tuning.jobs.create(
        model=model_pair,
        training_file=training.id,
        hyperparameters={"n_epochs": "auto"},
        # Our method type and block are not in the SDK's typed params; they pass through as is.
        method={"type": "asft", "asft": {"hyperparameters": {"lambda": 0.5}}},
        suffix="sdk-bot",
        metadata={"env": "test"},
    )
    assert job.id.startswith("ftjob-")
    assert job.object == "fine_tuning.job"
    assert job.status == "validating_files"
    assert job.model == model_pair
    assert job.training_file == training.id
    assert job.user_provided_suffix == "sdk-bot"
    assert job.metadata == {"env": "test"}
    assert isinstance(job.created_at, int)
    assert job.finished_at is None
    assert job.hyperparameters.n_epochs == 3
    assert job.hyperparameters.batch_size == 8
    method = as_dict(job)["method"]
    assert method["type"] == "asft"
    assert method["asft"]["hyperparameters"]["lambda"] == 0.5

    fetched = sdk.fine_tuning.jobs.retrieve(job.id)
    assert fetched.id == job.id
    assert fetched.seed == job.seed

    # A second job, and an Idempotency-Key retry that returns it instead of a third.
    second = sdk.fine_tuning.jobs.create(
        model=model_pair, training_file=training.id, extra_headers={"Idempotency-Key": "sdk-1"}
    )
    retry = sdk.fine_tuning.jobs.create(
        model=model_pair, training_file=training.id, extra_headers={"Idempotency-Key": "sdk-1"}
    )
    assert retry.id == second.id
    # Our own fields go through extra_body.
    third = sdk.fine_tuning.jobs.create(
        model=model_pair,
        training_file=training.id,
        validation_file=training.id,
        extra_body={"evaluation": {"matcher": "exact_label"}, "auto_start": False},
    )
    assert as_dict(third)["evaluation"]["file"] == training.id
    assert as_dict(third)["validation"]["warnings"], "a validation file equal to training warns"

    # limit=1: the SDK's auto-pagination follows has_more/after over three pages.
    first_page = sdk.fine_tuning.jobs.list(limit=1)
    assert len(first_page.data) == 1
    assert first_page.has_more is True
    every = [item.id for item in sdk.fine_tuning.jobs.list(limit=1)]
    assert sorted(every) == sorted([job.id, second.id, third.id])
    assert len(every) == 3
    assert [item.id for item in sdk.fine_tuning.jobs.list(metadata={"env": "test"})] == [job.id]

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=1))
    assert [event.message for event in events] == [f"Created fine-tuning job: {job.id}"]
    assert all(event.id.startswith("ftevent-") for event in events)
    assert all(isinstance(event.created_at, int) for event in events)

    with app.state.sessions() as session:
        assert transition(session, job.id, "validating_files", "queued")
        assert transition(session, job.id, "queued", "running")
        for step in (3, 6):
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=job.id,
                    step=step,
                    metrics={"step": step, "train_loss": 1.0 / step},
                    storage_key=job_key(job.id, "checkpoints", f"step-{step:06d}"),
                )
            )
        session.commit()
    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert [item.step_number for item in checkpoints] == [6, 3]
    for item in checkpoints:
        assert item.id.startswith("ftckpt-")
        assert item.object == "fine_tuning.job.checkpoint"
        assert item.fine_tuning_job_id == job.id
        assert item.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{item.step_number}")
        assert isinstance(item.created_at, int)
        assert item.metrics.step == item.step_number

    # Running: cancel asks the worker to stop; a waiting job is cancelled at once.
    stopping = sdk.fine_tuning.jobs.cancel(job.id)
    assert stopping.status == "running"
    assert (
        sdk.fine_tuning.jobs.list_events(job.id, limit=1)
        .data[0]
        .message.startswith("Cancellation requested")
    )
    cancelled = sdk.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled"
    assert isinstance(cancelled.finished_at, int)
    with pytest.raises(openai.ConflictError) as conflict:
        sdk.fine_tuning.jobs.cancel(second.id)
    assert conflict.value.code == "job_not_cancellable"


def test_errors_reach_the_sdk_with_our_codes(
    sdk: openai.OpenAI, base_url: str, model_pair: str
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert missing.value.status_code == 404
    assert missing.value.code == "job_not_found"
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["code"] == "job_not_found"
    assert missing.value.body["type"] == "not_found_error"
    assert missing.value.param == "fine_tuning_job_id"

    with pytest.raises(openai.NotFoundError) as no_file:
        sdk.fine_tuning.jobs.create(model=model_pair, training_file="file-nothere")
    assert no_file.value.code == "file_not_found"
    assert no_file.value.param == "training_file"

    training = sdk.files.create(file=("t.jsonl", jsonl(sentiment_rows(20))), purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        sdk.fine_tuning.jobs.create(
            model=model_pair, training_file=training.id, hyperparameters={"n_epochs": 0}
        )
    assert invalid.value.code == "invalid_request"
    assert invalid.value.param == "hyperparameters.n_epochs"

    for _ in range(3):
        sdk.fine_tuning.jobs.create(model=model_pair, training_file=training.id)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.fine_tuning.jobs.create(model=model_pair, training_file=training.id)
    assert limited.value.code == "too_many_active_jobs"

    with (
        openai.OpenAI(base_url=base_url, api_key="asft-wrong", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError) as unauthorised,
    ):
        stranger.fine_tuning.jobs.list()
    assert unauthorised.value.code == "invalid_api_key"
