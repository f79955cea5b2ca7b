"""A job through a real Celery worker process: validated, trained, evaluated, gated, stored."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from asft_core.zoo import ZooPaths
from tests.worker.conftest import create_job, upload_rows, wait_for_job


def test_a_job_runs_end_to_end_and_its_adapter_loads(
    client: TestClient,
    team_key: str,
    zoo: ZooPaths,
    start_worker: Callable[[], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    headers = {"Authorization": f"Bearer {team_key}"}
    training = upload_rows(client, team_key, zoo.poisoned_file("sentiment", 0.1), 40)
    held_out = upload_rows(client, team_key, zoo.task_file("sentiment", "eval"), 20)
    start_worker()
    job_id = create_job(
        client,
        team_key,
        training,
        "asft",
        {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        validation_file=held_out,
        suffix="e2e",
        evaluation={"matcher": "exact_label"},
    )
    job = wait_for_job(client, team_key, job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] in ("succeeded", "failed"), job
    if job["status"] == "failed":
        assert job["error"]["code"] == "safety_gate_failed", job["error"]
    assert job["fine_tuned_model"] == f"ft:tiny-chat:search:e2e:{job['id'].removeprefix('ftjob-')}"
    assert job["trained_tokens"] > 0
    assert job["validation"]["training_tokens"] > 0
    assert job["safety"]["harmful_score_after"] is not None

    events = client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=headers
    ).json()
    metric_steps = sorted(e["data"]["step"] for e in events["data"] if e["type"] == "metrics")
    assert metric_steps == [1, 2, 3, 4, 5]
    checkpoints = client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers
    ).json()
    assert sorted(c["step_number"] for c in checkpoints["data"]) == [2, 4, 5]
    # With a validation file, each checkpoint measured the loss on all of it.
    assert all(c["metrics"]["full_valid_loss"] > 0 for c in checkpoints["data"])
    curves = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", headers=headers).json()
    assert [point["step"] for point in curves["data"]] == [1, 2, 3, 4, 5]
    assert all(point["train_loss"] > 0 for point in curves["data"])  # the worker's columns
    assert [point["step"] for point in curves["validation"]] == [2, 4, 5]

    report = client.get(f"/v1/fine_tuning/jobs/{job['id']}/report", headers=headers).json()
    fine_tuned = report["report"]["evaluation"]["fine_tuned"]
    assert fine_tuned["safety"]["overall"]["total"] == 8
    assert fine_tuned["task"]["accuracy"]["total"] == 8
    # The job's summary carries the report's figures, for lists that show them.
    assert job["safety"]["accuracy_after"] == fine_tuned["task"]["accuracy"]["value"]
    reference = report["report"]["evaluation"]["reference"]
    assert job["safety"]["accuracy_before"] == reference["task"]["accuracy"]["value"]

    download = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", headers=headers)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"]
    model = client.get(f"/v1/models/{job['fine_tuned_model']}", headers=headers).json()
    assert model["sha256"] == download.headers["x-content-sha256"]
    with tarfile.open(fileobj=io.BytesIO(download.content)) as archive:
        archive.extractall(tmp_path / "download", filter="data")
    adapter = tmp_path / "download" / "adapter"
    assert '"base_model_name_or_path": "tiny-chat"' in (adapter / "adapter_config.json").read_text()

    # The downloaded adapter reproduces the worker's evaluation on the same prompts.
    from peft import PeftModel

    from asft_core.evaluation.harness import (
        EvalOptions,
        EvalSuite,
        evaluate_model,
        load_for_evaluation,
    )

    model, tokenizer = load_for_evaluation(str(zoo.aligned))
    model = PeftModel.from_pretrained(model, str(adapter))
    again = evaluate_model(model, tokenizer, EvalSuite.load(zoo.eval_suite), EvalOptions(limit=8))
    assert again.safety is not None
    assert again.safety.overall.value == fine_tuned["safety"]["overall"]["value"]
