"""The embedded default's broker between real processes: every message whole, and once."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty

import pytest
from fastapi.testclient import TestClient
from kombu import Connection

from asft_core.zoo import ZooPaths
from service.broker import Transport
from tests.worker.conftest import create_job, upload_rows, wait_for_job

PRODUCERS, CONSUMERS, PER_PRODUCER = 3, 2, 60
# Messages of 2 MB take long enough to write that a consumer polling the folder meets one
# half written on Kombu's own transport within a few dozen messages (seen failing every run).
PADDING = 2_000_000


def _connection(folder: Path) -> Connection:
    for name in ("out", "processed", "control"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return Connection(
        "filesystem://",
        transport=Transport,
        transport_options={
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.001,
        },
    )


def _produce(folder: Path, producer: int) -> None:
    with _connection(folder) as connection:
        queue = connection.SimpleQueue("gpu")
        for number in range(PER_PRODUCER):
            queue.put({"producer": producer, "number": number, "padding": "x" * PADDING})


def _consume(folder: Path, idle_s: float, out: Path) -> None:
    received: list[list[int]] = []
    with _connection(folder) as connection:
        queue = connection.SimpleQueue("gpu")
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            try:
                message = queue.get(block=True, timeout=0.05)
            except Empty:
                continue
            received.append([message.payload["producer"], message.payload["number"]])
            message.ack()
            last = time.monotonic()
    out.write_text(json.dumps(received))


def test_messages_cross_processes_whole_and_exactly_once(tmp_path: Path) -> None:
    # Consumers poll while producers write, the race that stops a worker on Kombu's own
    # transport (a consumer reading a message file before it was written).
    spawn = multiprocessing.get_context("spawn")
    consumers = [
        spawn.Process(target=_consume, args=(tmp_path, 5.0, tmp_path / f"consumer-{n}.json"))
        for n in range(CONSUMERS)
    ]
    producers = [spawn.Process(target=_produce, args=(tmp_path, n)) for n in range(PRODUCERS)]
    for process in consumers + producers:
        process.start()
    for process in producers + consumers:
        process.join(timeout=180)
        assert process.exitcode == 0

    received = [
        tuple(pair)
        for n in range(CONSUMERS)
        for pair in json.loads((tmp_path / f"consumer-{n}.json").read_text())
    ]
    sent = {(producer, number) for producer in range(PRODUCERS) for number in range(PER_PRODUCER)}
    assert len(received) == len(sent)  # nothing twice
    assert set(received) == sent  # nothing lost
    assert not (tmp_path / "rejected").exists()
    assert list((tmp_path / "out").iterdir()) == []
    assert list((tmp_path / "processed").iterdir()) == []


def test_a_wait_for_messages_returns_soon_so_an_idle_worker_stops_at_once(
    tmp_path: Path,
) -> None:
    # Celery's blocking loop asks for 2 s and looks for a stop request only between waits.
    with _connection(tmp_path) as connection:
        connection.SimpleQueue("gpu")  # declares the queue, as a worker does
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=2.0)
        waited = time.monotonic() - started
    assert waited < 1.0, f"an empty queue held the caller {waited:.2f}s of the 2 s asked"


def test_a_worker_sets_aside_a_message_it_cannot_read_and_goes_on(
    service_env: dict[str, str],
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    inbox = Path(service_env["ASFT_DATA_DIR"]) / "broker" / "out"
    inbox.mkdir(parents=True, exist_ok=True)
    # Written by something else than the service: empty, cut off mid-message, not a message;
    # a minute ago, so no longer being written.
    broken = {
        "1_empty.gpu.msg": b"",
        "2_partial.gpu.msg": b'{"body": "eyJ',
        "3_list.gpu.msg": b"[]",
    }
    for name, content in broken.items():
        (inbox / name).write_bytes(content)
        os.utime(inbox / name, (time.time() - 60, time.time() - 60))
    worker = start_worker()

    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 40)
    job_id = create_job(client, team_key, training, "asft", {"n_epochs": 1, "batch_size": 8})
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed"}, timeout_s=180)

    assert job["status"] == "succeeded" or job["error"]["code"] == "safety_gate_failed"
    assert worker.poll() is None
    rejected = Path(service_env["ASFT_DATA_DIR"]) / "broker" / "rejected"

    def set_aside() -> list[str]:
        return sorted(p.name for p in rejected.iterdir()) if rejected.exists() else []

    # The job's message sorts before the broken ones: when the worker's first poll finds it,
    # it trains first and meets the broken files on its next poll, after the job finished.
    deadline = time.monotonic() + 15
    while set_aside() != sorted(broken) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set_aside() == sorted(broken)
