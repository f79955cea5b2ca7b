"""The dashboard's job page with 100k metrics events: time to interactive and bytes, in a real
browser; and the metrics endpoint's latency.

Seeds a fresh SQLite database (``--database-url`` for another) with a team, its key, a model
pair and a running job holding ``--steps`` metrics events (the worker's rows) and some message
events, serves the API with uvicorn on a free port, and opens ``/ui#/jobs/<id>`` in Debian's
headless Chromium ``--rounds`` times, each a fresh page load with an empty cache. Time to
interactive is the page's ``asft-ready-job`` performance mark, from navigation start: the
HTML, script and style, the API calls (job, metrics at 600 points, events, checkpoints) and
the charts drawn. Bytes are the transfer sizes of the page and every request it made. Then
``GET .../metrics?resolution=600`` ``--requests`` times, one after another: p50 and p99, and
for scale the bytes of every step (``resolution=10000`` on a 10,000-step slice is what a
client without the endpoint would page through per 10k steps).

Targets: time to interactive < 1 s and < 500 kB transferred (median of the rounds).

    python bench/dashboard.py [--steps 100000] [--rounds 5] [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import insert

from api.schemas.jobs import JobCreate, job_spec
from service.db.migrate import upgrade_head
from service.db.models import File, Job, JobEvent, ModelPair, new_id, now
from service.db.session import make_engine, transaction
from service.teams import create_team_with_key

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "bench-chat"
TARGET_TTI_S = 1.0
TARGET_BYTES = 500_000
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def seed(database_url: str, steps: int) -> tuple[str, str]:
    """The team's key and a running job with ``steps`` metrics events."""
    engine = make_engine(database_url)
    method = job_spec(JobCreate(model=MODEL_ID, training_file="file-bench")).to_json()
    started = now() - steps
    try:
        with transaction(engine) as session:
            session.add(ModelPair(id=MODEL_ID, aligned_model="bench/chat", base_model="bench/base"))
            team, key = create_team_with_key(session, "bench")
            file = File(
                id=new_id("file"),
                team_id=team.id,
                filename="train.jsonl",
                purpose="fine-tune",
                bytes=1,
                sha256="0" * 64,
                storage_key="unused",
                row_format="chat",
                num_examples=100,
            )
            job = Job(
                id=new_id("ftjob"),
                team_id=team.id,
                model=MODEL_ID,
                training_file=file.id,
                status="running",
                method=method,
                validation={"training_examples": 100, "total_steps": 2 * steps, "warnings": []},
                seed=1,
                attempt=1,
                created_at=started,
                started_at=started,
                estimated_finish=now() + steps,
            )
            session.add_all([file, job])
            session.flush()
            for index in range(60):
                session.add(JobEvent(job_id=job.id, level="info", message=f"message {index}"))
            session.execute(
                insert(JobEvent),
                [
                    {
                        "id": new_id("ftevent"),
                        "job_id": job.id,
                        "created_at": started + step,
                        "level": "info",
                        "type": "metrics",
                        "message": f"Step {step}/{2 * steps}: loss={2 / (1 + step / 100):.4f}",
                        "step": step,
                        "train_loss": 2 / (1 + step / 100) + 0.05 * ((step * 7919) % 13) / 13,
                        "penalty": 1e-4 / (1 + step / 1000),
                        "learning_rate": 5e-5 * (1 - step / (2 * steps)),
                        "data": {
                            "step": step,
                            "total_steps": 2 * steps,
                            "train_loss": 2 / (1 + step / 100) + 0.05 * ((step * 7919) % 13) / 13,
                            "penalty": 1e-4 / (1 + step / 1000),
                            "loss": 2 / (1 + step / 100),
                            "learning_rate": 5e-5 * (1 - step / (2 * steps)),
                            "tokens_per_s": 2048.0,
                            "trained_tokens": 4096 * step,
                        },
                    }
                    for step in range(1, steps + 1)
                ],
            )
            job_id = job.id
    finally:
        engine.dispose()
    return key, job_id


def serve(database_url: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``asft api`` (uvicorn, one process) on ``port``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ASFT_")},
        "ASFT_DATA_DIR": str(data_dir),
        "ASFT_DATABASE_URL": database_url,
        "ASFT_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "asft.cli", "api", "--port", str(port)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)


def browser() -> object:
    """Headless Chromium with an empty profile (nothing cached between page loads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1000")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


PAGE_FIGURES = """
const ready = performance.getEntriesByName('asft-ready-job')[0];
if (!ready) return null;
const entries = [...performance.getEntriesByType('navigation'),
                 ...performance.getEntriesByType('resource')]
  .filter(e => e.startTime <= ready.startTime);
return [ready.startTime, entries.reduce((sum, e) => sum + e.transferSize, 0), entries.length];
"""


def measure_page(driver: object, url: str, key: str, job_id: str) -> tuple[float, int, int]:
    """One fresh load of the job page: (seconds to interactive, bytes, requests)."""
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})  # type: ignore[attr-defined]
    driver.get("about:blank")  # type: ignore[attr-defined]
    driver.get(f"{url}/ui#/jobs")  # type: ignore[attr-defined]
    driver.execute_script(  # type: ignore[attr-defined]
        "sessionStorage.setItem('asft-api-key', arguments[0])", key
    )
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})  # type: ignore[attr-defined]
    driver.get("about:blank")  # type: ignore[attr-defined]
    driver.get(f"{url}/ui#/jobs/{job_id}")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        figures = driver.execute_script(PAGE_FIGURES)  # type: ignore[attr-defined]
        if figures:
            return figures[0] / 1000, int(figures[1]), int(figures[2])
        if time.monotonic() > deadline:
            raise RuntimeError("the job page never became interactive")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    args = parser.parse_args()
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        sys.exit("needs Debian's chromium and chromium-driver (make setup-tools)")
    with tempfile.TemporaryDirectory(prefix="asft-bench-dashboard-") as folder:
        data_dir = Path(folder)
        database_url = args.database_url or f"sqlite:///{data_dir / 'bench.db'}"
        upgrade_head(database_url, data_dir)
        started = time.monotonic()
        key, job_id = seed(database_url, args.steps)
        print(f"seeded {args.steps} metrics events in {time.monotonic() - started:.0f}s")
        port = free_port()
        server = serve(database_url, data_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, server)
            driver = browser()
            try:
                pages = [measure_page(driver, url, key, job_id) for _ in range(args.rounds)]
            finally:
                driver.quit()  # type: ignore[attr-defined]
            headers = {"Authorization": f"Bearer {key}"}
            metrics = f"{url}/v1/fine_tuning/jobs/{job_id}/metrics?resolution=600"
            timings = []
            with httpx.Client(headers=headers, timeout=30) as client:
                size = len(client.get(metrics).content)
                for _ in range(args.requests):
                    begun = time.perf_counter()
                    client.get(metrics).raise_for_status()
                    timings.append(1000 * (time.perf_counter() - begun))
                every = client.get(f"{url}/v1/fine_tuning/jobs/{job_id}/events?limit=1000").content
        finally:
            server.terminate()
            server.wait(timeout=20)
    tti = statistics.median(p[0] for p in pages)
    transferred = statistics.median(p[1] for p in pages)
    print(f"job page, {args.steps} steps, {args.rounds} fresh loads in headless Chromium:")
    print(
        f"  time to interactive: median {1000 * tti:.0f} ms "
        f"(rounds: {', '.join(f'{1000 * p[0]:.0f}' for p in pages)}; target < "
        f"{1000 * TARGET_TTI_S:.0f} ms) {'met' if tti < TARGET_TTI_S else 'NOT met'}"
    )
    print(
        f"  transferred: median {transferred / 1000:.1f} kB in {pages[0][2]} requests "
        f"(target < {TARGET_BYTES / 1000:.0f} kB) "
        f"{'met' if transferred < TARGET_BYTES else 'NOT met'}"
    )
    print(
        f"metrics endpoint (600 points, {size / 1000:.1f} kB), {args.requests} requests: "
        f"p50 {percentile(timings, 0.5):.1f} ms, p99 {percentile(timings, 0.99):.1f} ms"
    )
    per_step = len(every) / 1000
    print(
        f"for scale: the events endpoint sends {per_step:.0f} bytes per step, so every step "
        f"would be {per_step * args.steps / 1e6:.1f} MB "
        f"({per_step * args.steps / size:.0f}x the metrics endpoint's answer)"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    """Until the API answers (it migrated nothing: the bench did)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
