"""The reconciler re-sends a waiting job's message only when it can have been lost: a long
queue of jobs that only wait for a busy worker puts no duplicates on the broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import update

from asft_core.zoo import ZooPaths
from service.db.models import File, Job, now
from service.db.session import make_engine, transaction
from service.queue import broker_epoch, make_celery
from service.storage import ArtifactStore
from tests.worker.conftest import create_job, settings_from, upload_rows
from worker.persistence import JobContext, Reconciled, reconcile, took_message


@pytest.fixture
def context(service_env: dict[str, str]) -> Iterator[JobContext]:
    """What the reconciler in a worker process would use, on the test's database."""
    settings = settings_from(service_env)
    engine = make_engine(settings.resolved_database_url)
    yield JobContext(settings, engine, ArtifactStore(settings.resolved_artifact_dir))
    engine.dispose()


@pytest.fixture
def broker(service_env: dict[str, str]) -> Celery:
    """The embedded default's filesystem broker, as the API and the worker use it."""
    return make_celery(settings_from(service_env))


def _messages(broker: Celery) -> list[str]:
    """The ids each message waiting in the broker's folder carries."""
    folder = Path(broker.conf.broker_transport_options["data_folder_in"])
    return [json.loads(f.read_text())["headers"]["argsrepr"] for f in folder.glob("*.gpu.msg")]


def _waiting_job(client: TestClient, key: str, zoo: ZooPaths) -> str:
    training = upload_rows(client, key, zoo.poisoned_file("sentiment", 0.0), 12)
    return create_job(client, key, training, "supervised", {"n_epochs": 1})


def _pass(context: JobContext, broker: Celery) -> Reconciled:
    """A reconciler pass once the job has waited longer than the stale period (1 s; the
    times are whole seconds)."""
    time.sleep(2.1)
    return reconcile(context, broker, stale_after_s=1)


def test_a_waiting_job_whose_message_is_on_the_broker_is_not_sent_again(
    client: TestClient, team_key: str, zoo: ZooPaths, context: JobContext, broker: Celery
) -> None:
    job_id = _waiting_job(client, team_key, zoo)
    assert sum(job_id in m for m in _messages(broker)) == 1
    passed = _pass(context, broker)
    assert passed.resent == {} and passed.requeued == []
    assert sum(job_id in m for m in _messages(broker)) == 1


def test_a_flushed_broker_folder_gets_the_message_again(
    client: TestClient, team_key: str, zoo: ZooPaths, context: JobContext, broker: Celery
) -> None:
    job_id = _waiting_job(client, team_key, zoo)
    folder = Path(broker.conf.broker_transport_options["data_folder_in"])
    for path in [*folder.glob("*.msg"), folder.parent / "epoch"]:
        path.unlink()
    passed = _pass(context, broker)
    assert "lost its messages" in passed.resent[job_id]
    assert sum(job_id in m for m in _messages(broker)) == 1
    assert _pass(context, broker).resent == {}  # sent once, in the new epoch


def test_a_taken_message_is_sent_again_once_the_scan_no_longer_holds_the_job(
    client: TestClient, team_key: str, zoo: ZooPaths, context: JobContext, broker: Celery
) -> None:
    job_id = _waiting_job(client, team_key, zoo)
    took_message(context, job_id)  # as a worker does; it then waits for the file's scan
    assert _pass(context, broker).resent == {}  # the scan will send it when it ends
    with transaction(context.engine) as session:
        training = session.get(Job, job_id).training_file  # type: ignore[union-attr]
        session.execute(update(File).where(File.id == training).values(scan_status="succeeded"))
    # The scan ended, yet no message came: the worker holding the job may have died.
    assert "may have died" in _pass(context, broker).resent[job_id]


def test_a_message_no_worker_took_within_the_visibility_timeout_is_sent_again(
    client: TestClient, team_key: str, zoo: ZooPaths, context: JobContext, broker: Celery
) -> None:
    job_id = _waiting_job(client, team_key, zoo)
    long_ago = now() - context.settings.visibility_timeout_s - 1
    with transaction(context.engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(sent_at=long_ago))
    assert "visibility timeout" in _pass(context, broker).resent[job_id]


def test_redis_names_a_new_epoch_only_when_it_loses_its_messages(private_redis: str) -> None:
    app = Celery("asft", broker=private_redis)
    first = broker_epoch(app)
    assert first is not None and broker_epoch(app) == first
    redis.Redis.from_url(private_redis).flushall()
    second = broker_epoch(app)
    assert second is not None and second != first


def test_a_pending_scan_is_sent_again_only_when_its_message_can_have_been_lost(
    client: TestClient, team_key: str, zoo: ZooPaths, context: JobContext, broker: Celery
) -> None:
    from worker.scan import _claim

    file_id = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 12)
    with transaction(context.engine) as session:
        assert session.get(File, file_id).scan_status == "pending"  # type: ignore[union-attr]
    assert sum(file_id in m for m in _messages(broker)) == 1
    # Waiting for a busy worker: its message is on the broker, nothing is sent again.
    assert _pass(context, broker).rescanned == {}
    assert sum(file_id in m for m in _messages(broker)) == 1
    # A worker takes it and dies mid-scan: the stale scan goes back to pending and is re-sent,
    # once.
    assert _claim(context, file_id) is not None
    passed = _pass(context, broker)
    assert "may have died" in passed.rescanned[file_id]
    assert sum(file_id in m for m in _messages(broker)) == 2  # the test never consumed the first
    assert _pass(context, broker).rescanned == {}
