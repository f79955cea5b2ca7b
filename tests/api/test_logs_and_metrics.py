"""Structured logs with request ids, and the workers' state in the metrics."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from service import logs
from service.logs import JsonFormatter
from tests.api.conftest import auth


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    given = client.get("/healthz", headers={"X-Request-ID": "trace-12345678"})
    assert given.headers["x-request-id"] == "trace-12345678"
    # Junk is replaced, not echoed (no header injection, bounded size).
    junk = client.get("/healthz", headers={"X-Request-ID": "a b"}).headers["x-request-id"]
    assert junk != "a b" and len(junk) == 32


def test_log_lines_are_json_with_the_ids_in_scope() -> None:
    record = logging.LogRecord("asft.api", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    token = logs.request_id.set("req-1")
    job = logs.job_id.set("ftjob-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        logs.request_id.reset(token)
        logs.job_id.reset(job)
    assert line["message"] == "hello x"
    assert line["level"] == "WARNING"
    assert (line["request_id"], line["job_id"]) == ("req-1", "ftjob-1")
    assert "request_id" not in json.loads(JsonFormatter().format(record))


def test_metrics_show_queue_depth_and_worker_gauges(
    client: TestClient, team_key: str, training_file: str, model_pair: str
) -> None:
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model_pair, "training_file": training_file},
        headers=auth(team_key),
    )
    assert created.status_code == 200
    text = client.get("/metrics").text
    assert "asft_queue_depth 1.0" in text
    assert 'asft_jobs{status="validating_files"} 1.0' in text
    assert "asft_training_tokens_per_second 0.0" in text
    assert 'asft_job_duration_seconds{quantile="0.5"}' in text
