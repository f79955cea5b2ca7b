"""Webhooks: signed, retried with backoff, and never sent to private addresses by default."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from service.webhooks import SIGNATURE_HEADER, WebhookRefused, check_url, verify
from tests.worker.conftest import ADMIN_KEY, create_job, upload_rows, wait_for_job


class Receiver:
    """A local HTTP endpoint that fails its first call, then records what it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.got_one = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.calls) == 1 else 200)
                self.end_headers()
                if len(receiver.calls) > 1:
                    receiver.got_one.set()

            def log_message(self, *_: Any) -> None:
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()


def test_a_finished_job_calls_the_team_webhook_signed_and_retried(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    receiver: Receiver,
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    team = client.get("/v1/admin/teams", headers=admin).json()["data"][0]
    patched = client.patch(
        f"/v1/admin/teams/{team['id']}", json={"webhook_url": receiver.url}, headers=admin
    )
    assert patched.status_code == 200, patched.text
    secret = patched.json()["webhook_secret"]
    assert secret
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.0), 40)
    start_worker()
    job_id = create_job(client, team_key, training, "supervised", {"n_epochs": 1})
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    assert receiver.got_one.wait(30)
    assert len(receiver.calls) == 2  # one failure (HTTP 500), then the retry
    headers, body = receiver.calls[-1]
    assert verify(secret, headers[SIGNATURE_HEADER], body)
    assert not verify("another-secret", headers[SIGNATURE_HEADER], body)
    event = json.loads(body)
    assert event["type"] == f"fine_tuning.job.{job['status']}"
    assert event["data"]["id"] == job_id
    assert headers["X-ASFT-Event-Id"] == event["id"]


def test_private_and_loopback_urls_are_refused_unless_allow_listed(client: TestClient) -> None:
    for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://169.254.169.254/latest"):
        with pytest.raises(WebhookRefused):
            check_url(url, [])
    check_url("http://127.0.0.1:9/x", ["127.0.0.1"])
    with pytest.raises(WebhookRefused):
        check_url("ftp://example.org/x", [])
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    team = client.post("/v1/admin/teams", json={"name": "hooks"}, headers=admin).json()
    refused = client.patch(
        f"/v1/admin/teams/{team['id']}", json={"webhook_url": "http://10.0.0.5/x"}, headers=admin
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "webhook_url_not_allowed"
