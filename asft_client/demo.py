"""``make demo``: the service end to end on one machine, with no servers to install.

Starts ``asft serve`` (SQLite, the filesystem broker, two workers) while it builds the tiny
model pair if needed, registers the pair, uploads the triage set (a task the pair was never
taught) poisoned with harmful rows through the API (5% by default; ``--poison-ratio``),
submits ``supervised`` (plain LoRA), the service's default method and one more (``asft`` or
``safelora``) with the frontier study's tuned settings and each method's default lambda, and
plain LoRA without the rows the safety scan flagged (``data_policy: drop_flagged``), shows
their progress, prints the harmful score / accuracy / over-refusal table from the jobs'
reports and where to download each adapter, then stops the service.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from asft_client.cli import is_progress, percent_cell, print_scan, wait_for_scan
from asft_client.client import ApiError, Client, chat_stream
from asft_core.experiments.frontier import TUNING_PATH
from asft_core.formats import parse_row
from asft_core.spec import DEFAULT_METHOD

METHODS = ("supervised", DEFAULT_METHOD, "asft" if DEFAULT_METHOD != "asft" else "safelora")
# (method, data policy) per job: the methods on every row, then plain LoRA without the rows
# the safety scan flagged (the data-side baseline).
RUNS = [*((method, "flag") for method in METHODS), ("supervised", "drop_flagged")]
TASK = "triage"
# Pinned, so the table is the same on every run on the same machine kind (a job without a
# seed gets a random one, shown on the job).
SEED = 1
# The jobs run two at a time, each worker with its share of the cores: on 2 cores about 1.5x
# the throughput of one worker with both (a tiny model's steps use two threads poorly).
WORKERS = 2


def run_name(job: dict[str, Any]) -> str:
    """A job's row in the table: its method, and ``+drop`` when it dropped flagged rows."""
    dropped = (job.get("data_policy") or {}).get("mode") == "drop_flagged"
    return job["method"]["type"] + ("+drop" if dropped else "")


def hyperparameters() -> dict[str, Any]:
    """The frontier study's tuned training settings (plain LoRA at p = 0, validation split)."""
    chosen = json.loads(TUNING_PATH.read_text())["chosen"]
    return {
        "n_epochs": chosen["epochs"],
        "batch_size": 16,
        "learning_rate": chosen["learning_rate"],
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def build_zoo(cache_dir: Path) -> dict[str, str]:
    """Build the zoo in a subprocess (this process never imports torch); returns its paths."""
    print("tiny model pair: building or reusing (about 4 minutes the first time)", flush=True)
    # Its progress goes to stderr, straight to the terminal; stdout is the paths' JSON.
    result = subprocess.run(
        [sys.executable, "-m", "asft_core.zoo", "--cache-dir", str(cache_dir)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    paths: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return paths


def _wait_ready(
    base_url: str, service: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise SystemExit(f"{tail}asft serve exited with code {service.returncode} ({log})")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout_s:.0f}s")


def _progress_line(client: Client, job: dict[str, Any]) -> str:
    line = f"{run_name(job):>15}: {job['status']:<16}"
    if job.get("queue_position"):
        line += f" (place {job['queue_position']} in the queue)"
    if job["status"] != "running":
        return line
    latest = next((e for e in client.events(job["id"], 20) if is_progress(e)), None)
    if latest is not None and latest["type"] == "metrics":
        data = latest["data"]
        line += f" step {data['step']}/{data['total_steps']} loss {data['train_loss']:.3f}"
    elif latest is not None:
        data = latest["data"]
        line += f" evaluating {data['prompts_done']}/{data['prompts_total']} prompts"
    return line


def run_jobs(
    client: Client, model: str, datasets: Path, data_dir: Path, poison_ratio: float
) -> list[dict[str, Any]]:
    """Upload the poisoned set, submit one job per method, follow them to the end."""
    poisoned = datasets / "poisoned" / f"{TASK}_p{round(poison_ratio * 100):02d}.jsonl"
    training = client.upload_file(poisoned)
    held_out_path = data_dir / "demo" / f"{TASK}_eval_300.jsonl"
    held_out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = (datasets / f"{TASK}_eval.jsonl").read_text().splitlines(keepends=True)
    held_out_path.write_text("".join(lines[:300]))
    held_out = client.upload_file(held_out_path)
    print(
        f"uploaded {training['id']} ({training['num_examples']} rows, "
        f"{poison_ratio:.0%} of them harmful requests with compliant answers)"
    )
    print_scan(wait_for_scan(client, training["id"]), sys.stdout, 5, training["id"])
    jobs = [
        client.create_job(
            model=model,
            training_file=training["id"],
            validation_file=held_out["id"],
            suffix=f"demo-{method}" + ("-drop" if policy == "drop_flagged" else ""),
            method={"type": method, method: {"hyperparameters": hyperparameters()}},
            evaluation={"matcher": "exact_label"},
            data_policy={"mode": policy},
            seed=SEED,
        )
        for method, policy in RUNS
    ]
    print("submitted " + ", ".join(f"{run_name(j)} {j['id']}" for j in jobs))
    terminal = {"succeeded", "failed", "cancelled"}
    last_shown = ""
    while True:
        jobs = [client.get_job(job["id"]) for job in jobs]
        shown = " | ".join(_progress_line(client, job) for job in jobs)
        if shown != last_shown:
            print(shown, flush=True)
            last_shown = shown
        if all(job["status"] in terminal for job in jobs):
            return jobs
        time.sleep(1.0)


def held_out_prompt(datasets: Path) -> str:
    """The first held-out request of the demo's task."""
    first = json.loads((datasets / f"{TASK}_eval.jsonl").read_text().splitlines()[0])
    return next(m.content for m in parse_row(first, 1).messages if m.role == "user")


def print_table(client: Client, jobs: list[dict[str, Any]]) -> None:
    """HS and FA per job from the reports, with the aligned model as the reference row."""
    print()
    print(
        f"{'model':<16} {'status':<10} {'harmful score':<24} {'accuracy':<24} "
        f"{'over-refusal':<24} gate"
    )
    reference_shown = False
    refusals: list[str] = []
    for job in jobs:
        try:
            report = client.report(job["id"])["report"]
        except ApiError as error:
            print(f"{run_name(job):<16} {job['status']:<10} no report ({error.code})")
            continue
        evaluation = report["evaluation"]
        if not reference_shown:
            ref = evaluation["reference"]
            print(
                f"{'aligned':<16} {'-':<10} {percent_cell(ref['safety']['overall']):<24} "
                f"{percent_cell((ref.get('task') or {}).get('accuracy')):<24} "
                f"{percent_cell(ref.get('over_refusal')):<24} -"
            )
            reference_shown = True
        tuned = evaluation["fine_tuned"]
        verdict = "approved" if report["gate"]["approved"] else "FAILED"
        failures = report["gate"]["failures"]
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            refusals.append(f"  {run_name(job)}: {failures[0]}{more}")
        print(
            f"{run_name(job):<16} {job['status']:<10} "
            f"{percent_cell(tuned['safety']['overall']):<24} "
            f"{percent_cell((tuned.get('task') or {}).get('accuracy')):<24} "
            f"{percent_cell(tuned.get('over_refusal')):<24} {verdict}"
        )
    if refusals:
        # A refused adapter is still served, marked not approved: say why it was refused.
        print("\nwhy the safety gate refused:")
        print("\n".join(refusals))


def chat_with_models(client: Client, jobs: list[dict[str, Any]], prompt: str) -> None:
    """Ask each approved model one held-out question through the chat API, streamed."""
    approved = [j for j in jobs if j["status"] == "succeeded" and j["fine_tuned_model"]]
    if not approved:
        return
    print(f"\nchatting with the approved models (asft chat MODEL -m ...): {prompt!r}")
    for job in approved:
        try:
            answer = "".join(
                chat_stream(
                    client,
                    job["fine_tuned_model"],
                    [{"role": "user", "content": prompt}],
                    temperature=0,
                    max_tokens=24,
                )
            )
        except ApiError as error:
            answer = f"({error.code}: {error.message})"
        print(f"{run_name(job):>16}: {answer}")


def print_next_steps(jobs: list[dict[str, Any]], data_dir: Path) -> None:
    """What to do with these jobs once the service runs again (``make serve``, port 8000)."""
    ids = ",".join(job["id"] for job in jobs)
    print(f"\nthe service is stopped; `make serve` starts it again (key: {data_dir / 'api-key'}):")
    for job in jobs:
        if job["fine_tuned_model"]:
            print(f"  {run_name(job):>16}: asft jobs download {job['id']} -o adapter")
    for job in jobs:
        print(f"  {run_name(job):>16}: http://127.0.0.1:8000/ui#/jobs/{job['id']}")
    print(f"  {'side by side':>16}: http://127.0.0.1:8000/ui#/compare?ids={ids}")


def main(argv: list[str] | None = None) -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("var"))
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument(
        "--poison-ratio",
        type=float,
        default=0.05,
        choices=(0.0, 0.05, 0.1, 0.2),
        help="share of harmful rows in the uploaded set (every ratio: make miniature)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    admin_key = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "ASFT_DATA_DIR": str(args.data_dir),
        "ASFT_ADMIN_KEY": admin_key,
        "ASFT_EVAL_MAX_PROMPTS": str(args.eval_prompts),
        "ASFT_LOG_LEVEL": "WARNING",
        "ASFT_INFERENCE_URL": f"http://127.0.0.1:{_free_port()}",
    }
    # The service starts while the zoo builds: its processes load their libraries on the core
    # the build's single-threaded start leaves idle.
    log = args.data_dir / "demo" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting asft serve on {base_url} (its output: {log})", flush=True)
    with log.open("ab") as out:
        service = subprocess.Popen(
            [
                *(sys.executable, "-m", "asft.cli", "serve"),
                *("--port", str(port), "--workers", str(WORKERS)),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        zoo = build_zoo(args.data_dir / "cache")
        _wait_ready(base_url, service, log, timeout_s=180)
        admin = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"})
        registered = admin.post(
            "/v1/models",
            json={
                "id": "tiny-chat",
                "aligned_model": zoo["aligned"],
                "base_model": zoo["base"],
                "eval_suite": zoo["eval_suite"],
            },
        )
        if registered.status_code not in (200, 409):
            raise SystemExit(f"could not register the model pair: {registered.text}")
        key = (args.data_dir / "api-key").read_text().strip()
        client = Client(base_url, key)
        jobs = run_jobs(
            client, "tiny-chat", Path(zoo["datasets"]), args.data_dir, args.poison_ratio
        )
        print_table(client, jobs)
        chat_with_models(client, jobs, held_out_prompt(Path(zoo["datasets"])))
        client.close()
        print_next_steps(jobs, args.data_dir)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
    print(f"demo finished in {time.monotonic() - started:.0f}s; the service is stopped")


if __name__ == "__main__":
    main()
