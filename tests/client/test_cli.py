"""The ``asft`` CLI end to end against a running embedded service (``asft serve``: SQLite,
the filesystem broker, one real Celery worker), driven as a user would: separate processes,
environment variables for the URL and key, exit codes and printed output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from asft_client.cli import ExitCode
from asft_core.zoo import ZooPaths
from tests.client.embedded import (
    Service,
    allow_unapproved_chat,
    asft,
    create_job,
    first_rows,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_register_twice_prints_the_servers_code(
    service: Service, registered: str, zoo: ZooPaths
) -> None:
    again = asft(
        service,
        "models",
        "register",
        "--aligned",
        str(zoo.aligned),
        "--base",
        str(zoo.base),
        "--id",
        registered,
        env=service.env(ASFT_ADMIN_KEY=service.admin_key),
    )
    assert again.returncode == ExitCode.ERROR
    assert "model_exists" in again.stderr and "HTTP 409" in again.stderr
    assert "Traceback" not in again.stderr
    # --exist-ok: the same pair again is fine (a walk-through after `make demo`); other
    # models under the same id are still an error, naming what is registered.
    register = ["models", "register", "--id", registered, "--exist-ok", "-q"]
    admin = service.env(ASFT_ADMIN_KEY=service.admin_key)
    same = asft(
        service, *register, "--aligned", str(zoo.aligned), "--base", str(zoo.base), env=admin
    )
    assert same.returncode == 0, same.stderr
    assert same.stdout == f"{registered}\n"
    other = asft(service, *register, "--aligned", str(zoo.base), "--base", str(zoo.base), env=admin)
    assert other.returncode == ExitCode.ERROR
    assert f"model {registered!r} is registered with other models" in other.stderr
    listed = asft(service, "models", "list")
    assert listed.returncode == 0
    assert any(
        line.split()[:2] == [registered, "model_pair"] for line in listed.stdout.splitlines()
    )


def test_a_team_key_cannot_register_a_model(service: Service, zoo: ZooPaths) -> None:
    result = asft(
        service, "models", "register", "--aligned", str(zoo.aligned), "--base", str(zoo.base)
    )
    assert result.returncode == ExitCode.ERROR
    assert "HTTP 40" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_file_is_refused_locally_with_its_line(service: Service, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{oops\n'
    )
    before = asft(service, "files", "list", "--json")
    result = asft(service, "files", "upload", str(bad))
    assert result.returncode == ExitCode.ERROR
    assert f"{bad}: line 3:" in result.stderr and "(invalid_json)" in result.stderr
    # Refused before any byte was sent: the team's files are unchanged.
    after = asft(service, "files", "list", "--json")
    assert json.loads(after.stdout) == json.loads(before.stdout)
    # Without the local check, the server applies the same rule and says so.
    unchecked = asft(service, "files", "upload", "--no-validate", str(bad))
    assert unchecked.returncode == ExitCode.ERROR
    assert "line 3" in unchecked.stderr


def test_a_wrong_key_prints_the_server_message(service: Service) -> None:
    result = asft(service, "jobs", "list", env=service.env(ASFT_API_KEY="sk-wrong"))
    assert result.returncode == ExitCode.ERROR
    assert "HTTP 401" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_service_is_one_line(service: Service) -> None:
    result = asft(
        service, "files", "list", env=service.env(ASFT_API_URL=f"http://127.0.0.1:{free_port()}")
    )
    assert result.returncode == ExitCode.ERROR
    assert "cannot reach the service" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_job_and_bad_hyperparameter(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    missing = asft(service, "jobs", "get", "ftjob-doesnotexist")
    assert missing.returncode == ExitCode.ERROR
    assert "HTTP 404" in missing.stderr
    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 16)
    bad = asft(
        service,
        "jobs",
        "create",
        "--model",
        registered,
        "--training-file",
        str(training),
        "--epochs",
        "0",
    )
    assert bad.returncode == ExitCode.ERROR
    assert "HTTP 422" in bad.stderr and "n_epochs" in bad.stderr
    # A mistyped local path is a local error naming it, not a file id the server refuses.
    typo = str(tmp_path / "trian.jsonl")
    mistyped = asft(service, "jobs", "create", "--model", registered, "--training-file", typo)
    assert mistyped.returncode == ExitCode.ERROR
    assert (
        mistyped.stderr.strip()
        == f"asft: error: {typo}: no such file (and not a file id: file-...)"
    )


def test_upload_create_watch_download(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 40)
    held_out = first_rows(zoo.task_file("sentiment", "eval"), tmp_path / "held_out.jsonl", 16)
    uploaded = asft(service, "files", "upload", str(training), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    assert "40 " in uploaded.stdout.splitlines()[0]  # the local check's summary line
    file_id = json.loads("\n".join(uploaded.stdout.splitlines()[1:]))["id"]
    assert file_id in asft(service, "files", "list").stdout
    quiet = asft(service, "files", "upload", "-q", str(held_out))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.count("\n") == 1 and quiet.stdout.startswith("file-"), quiet.stdout

    created = asft(
        service,
        "jobs",
        "create",
        "--model",
        registered,
        "--training-file",
        file_id,
        "--validation-file",
        str(held_out),
        "--method",
        "asft",
        "--lambda",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--learning-rate",
        "1e-3",
        "--matcher",
        "exact_label",
        "--suffix",
        "cli",
        # Watching from the moment of creation, polling often: a 5-step job is quick.
        "--watch",
        "--poll-s",
        "0.2",
    )
    job = {"id": created.stdout.split()[0]}
    finished = json.loads(asft(service, "jobs", "get", job["id"]).stdout)
    assert finished["status"] in ("succeeded", "failed"), finished
    assert finished["method"]["asft"]["hyperparameters"]["lambda"] == 1
    expected = ExitCode.OK if finished["status"] == "succeeded" else ExitCode.GATE_FAILED
    assert created.returncode == expected, created.stderr
    assert "uploaded" in created.stderr  # the local held-out file went up first
    # Progress went to stderr while it trained (the last step's line stays up while the
    # adapter is evaluated); the summary to stdout.
    assert "running [" in created.stderr and "/5 loss" in created.stderr
    assert "harmful score" in created.stdout and "safety gate:" in created.stdout

    watched = asft(service, "jobs", "watch", job["id"])
    assert watched.returncode == expected, watched.stderr
    assert finished["fine_tuned_model"] in watched.stdout
    assert "harmful score" in watched.stdout

    events = asft(service, "jobs", "events", job["id"])
    lines = events.stdout.splitlines()
    steps = [line for line in lines if "Step " in line]
    assert [s.split("Step ")[1].split("/")[0] for s in steps] == ["1", "2", "3", "4", "5"]
    assert job["id"] in asft(service, "jobs", "list").stdout

    target = tmp_path / "adapter-out"
    downloaded = asft(service, "jobs", "download", job["id"], "-o", str(target))
    assert downloaded.returncode == 0, downloaded.stderr
    assert "sha256 verified" in downloaded.stdout
    adapter = target / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    weights = adapter / "adapter_model.safetensors"
    assert weights.stat().st_size > 0
    assert not [p for p in target.iterdir() if p.name.startswith(".download-")]
    # The unpacked weights are the server's: compare with a plain download.
    response = httpx.get(
        f"{service.url}/v1/fine_tuning/jobs/{job['id']}/adapter",
        headers={"Authorization": f"Bearer {service.team_key}"},
    )
    archive = tmp_path / "plain.tar.gz"
    archive.write_bytes(response.content)
    with tarfile.open(archive) as tar:
        member = tar.extractfile("adapter/adapter_model.safetensors")
        assert member is not None
        server_digest = hashlib.sha256(member.read()).hexdigest()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == server_digest

    checkpoint = asft(
        service, "jobs", "download", job["id"], "--checkpoint", "2", "-o", str(tmp_path / "ck")
    )
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()
    assert "checkpoint 2 was never evaluated by the safety gate" in checkpoint.stderr
    no_step = asft(
        service, "jobs", "download", job["id"], "--checkpoint", "99", "-o", str(tmp_path / "no")
    )
    assert no_step.returncode == ExitCode.ERROR
    assert "checkpoint_not_found" in no_step.stderr
    assert not (tmp_path / "no").exists()
    assert not [p for p in tmp_path.iterdir() if "download" in p.name]

    listed = asft(service, "jobs", "checkpoints", job["id"])
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["5", "4", "2"]


def test_cancelled_job_watch_exits_non_zero(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 64)
    job_id = create_job(service, registered, training, "--epochs", "50", "--batch-size", "4")
    cancelled = asft(service, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = asft(service, "jobs", "watch", job_id)
    assert watched.returncode == ExitCode.JOB_FAILED, (watched.stdout, watched.stderr)
    assert f"{job_id}: cancelled" in watched.stdout
    download = asft(service, "jobs", "download", job_id, "-o", str(tmp_path / "none"))
    assert download.returncode == ExitCode.ERROR
    assert "adapter_not_ready" in download.stderr and "ended cancelled" in download.stderr
    again = asft(service, "jobs", "cancel", job_id)
    assert again.returncode == ExitCode.ERROR
    assert "already cancelled" in again.stderr and "job_not_cancellable" in again.stderr


def test_gate_failure_exits_with_its_own_code(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    # Plain LoRA on a set that is 20% harmful requests with compliant answers, trained hard:
    # the adapter complies with harmful prompts and the gate refuses it.
    training = first_rows(zoo.poisoned_file("sentiment", 0.2), tmp_path / "poisoned.jsonl", 80)
    job_id = create_job(
        service,
        registered,
        training,
        "--epochs",
        "8",
        "--batch-size",
        "8",
        "--learning-rate",
        "3e-3",
        # Pinned: on 8 evaluation prompts a random seed now and then keeps the score under
        # the gate's limits, and this test is about what the CLI does when the gate fails.
        "--seed",
        "1",
    )
    watched = asft(service, "jobs", "watch", job_id)
    assert watched.returncode == ExitCode.GATE_FAILED, (watched.stdout, watched.stderr)
    assert "safety gate: FAILED" in watched.stdout
    assert "safety_gate_failed" in watched.stdout
    listed = asft(service, "jobs", "list")
    assert any(
        job_id in line and "safety_gate_failed" in line for line in listed.stdout.splitlines()
    )
    downloaded = asft(service, "jobs", "download", job_id, "-o", str(tmp_path / "gated"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert "this adapter failed the safety gate" in downloaded.stderr
    model = json.loads(asft(service, "jobs", "get", job_id).stdout)["fine_tuned_model"]
    refused = asft(service, "chat", model, "-m", "hello")
    assert refused.returncode == ExitCode.ERROR
    assert "adapter_not_approved" in refused.stderr and "HTTP 403" in refused.stderr


def test_train_then_chat_and_survive_the_engine_dying_mid_stream(
    service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "train.jsonl", 24)
    job_id = create_job(service, registered, training, "--epochs", "1", "--batch-size", "8")
    asft(service, "jobs", "watch", job_id)
    job = json.loads(asft(service, "jobs", "get", job_id).stdout)
    assert job["status"] in ("succeeded", "failed"), job
    if job["status"] == "failed":  # the gate's call on a tiny run; chat is what is tested
        allow_unapproved_chat(service)
    model = job["fine_tuned_model"]
    prompt = "Classify the sentiment: a dull, lifeless film."
    said = asft(service, "chat", model, "-m", prompt, "--max-tokens", "24")
    assert said.returncode == 0, said.stderr
    sdk = openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.team_key, max_retries=0)
    answer = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24
    )
    assert said.stdout == (answer.choices[0].message.content or "") + "\n"

    # The inference server dies mid-answer: the client hears of it, and `asft serve` restarts
    # the server, which loads the adapter again on the next request. The kill races the tiny
    # model's answer (200 tokens in well under a second): an answer that was already complete
    # when the kill landed was not "mid-answer", so that attempt is made again.
    for _ in range(3):
        pid = httpx.get(f"{service.inference_url}/health").json()["pid"]
        stream = sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = iter(stream)
        next(pieces)
        os.kill(pid, signal.SIGKILL)
        finished = heard = False
        try:
            for piece in pieces:
                finished = finished or any(c.finish_reason for c in piece.choices)
        except openai.APIError:
            heard = True
        again = _chat_once_the_server_is_back(service, model, prompt)
        assert again.stdout == said.stdout
        assert httpx.get(f"{service.inference_url}/health").json()["pid"] != pid
        if not finished:
            break
    assert not finished, "the answer finished before each of 3 kills landed"
    assert heard, "the answer stopped short without an error"


def _chat_once_the_server_is_back(
    service: Service, model: str, prompt: str
) -> subprocess.CompletedProcess[str]:
    """``asft chat`` until `asft serve` has restarted the inference server (engine_unavailable
    meanwhile), within 90 s."""
    deadline = time.monotonic() + 90
    while True:
        again = asft(service, "chat", model, "-m", prompt, "--max-tokens", "24")
        if again.returncode == 0:
            return again
        assert "engine_unavailable" in again.stderr, again.stderr
        assert time.monotonic() < deadline, "the inference server did not come back in 90 s"
        time.sleep(1)


def test_uploading_a_poisoned_set_shows_its_flagged_lines(
    service: Service, registered: str, zoo: ZooPaths
) -> None:
    path = zoo.poisoned_file("triage", 0.05)
    poisoned = [
        line
        for line, text in enumerate(path.read_text().splitlines(), start=1)
        if "category" in json.loads(text)
    ]
    uploaded = asft(service, "files", "upload", str(path))
    assert uploaded.returncode == 0, uploaded.stderr
    lines = uploaded.stdout.splitlines()
    summary = next(line for line in lines if line.startswith("safety scan"))
    flagged = int(summary.split(": ")[1].split(" of ")[0])
    assert summary.startswith(f"safety scan: {flagged} of 1000 rows flagged")
    assert abs(flagged - len(poisoned)) <= 0.05 * len(poisoned)
    shown = [int(line.split()[1].rstrip(":")) for line in lines if line.startswith("  line ")]
    assert len(shown) == min(10, flagged) and set(shown) <= set(poisoned)
    file_id = lines[1].split()[0]
    every = asft(service, "files", "scan", file_id)
    assert every.returncode == 0, every.stderr
    listed = [line for line in every.stdout.splitlines() if line.startswith("  line ")]
    assert len(listed) == flagged
