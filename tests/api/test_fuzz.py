"""Schemathesis against the served ``/openapi.json``: every operation, every check, stateful
sequences from the links it infers (POST /v1/files -> GET /v1/files/{file_id}, POST a job ->
its events, ...): no 5xx, and every answer is one the document declares, in status, content
type, headers and body.

The database is seeded first (a model pair, files good and bad, a job of every kind with its
checkpoint, report and adapter), and path and body parameters draw those ids half the time, so
the id-bearing routes answer 200 too, not only 404. Team routes run first with a team key, the
admin routes after them with the admin key (they revoke keys, the team's own among them).
Examples are bounded for CI; ``ASFT_TEST_FUZZ_EXAMPLES`` and ``ASFT_TEST_FUZZ_SEED`` go deeper
or elsewhere. Jobs the fuzzer creates go to the filesystem broker under the test's folder; no
worker runs.
"""

from __future__ import annotations

import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.engine import events, from_schema

from api.main import create_app
from asft_core.zoo import ZooPaths
from service.jobs.state import transition
from service.settings import Settings
from tests.api.conftest import ADMIN, ADMIN_KEY, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import create_job, finish_job, install_real_adapters
from tests.core.test_serving import make_adapter

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("ASFT_TEST_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("ASFT_TEST_FUZZ_SEED", "7"))
ADMIN_PATHS = "^/v1/admin/"
# How often a parameter draws a seeded id instead of a generated string.
SEEDED_ID_PROBABILITY = 0.5
# Schema-valid requests that the service refuses for reasons a JSON schema cannot state: a
# model folder that does not exist, a dataset with too few examples or an evaluation file of
# the wrong format, a webhook to a private address. positive_data_acceptance takes 422 there.
SEMANTIC_422 = (
    "POST /v1/models",
    "POST /v1/fine_tuning/jobs",
    "PATCH /v1/admin/teams/{team_id}",
)
# Reads that must have answered 200 at least once: the seeding reached them.
MUST_SUCCEED = (
    "GET /v1/files",
    "GET /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
    "POST /v1/files",
    "GET /v1/fine_tuning/jobs",
    "POST /v1/fine_tuning/jobs",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/report",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /v1/admin/teams",
    "GET /v1/admin/teams/{team_id}/keys",
    "PATCH /v1/admin/teams/{team_id}",
    "POST /v1/admin/teams/{team_id}/keys",
)


@dataclass(frozen=True)
class Seeded:
    """What exists before fuzzing starts: ids for the parameters to draw from."""

    team_key: str
    team_id: str
    spare_key_id: str
    files: list[str]
    jobs: list[str]
    models: list[str]
    checkpoint_step: int


@dataclass
class FuzzReport:
    """What one schemathesis run did and found."""

    cases: int = 0
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stateful_transitions: int = 0
    # (earlier operation, later operation) of stateful steps that used an earlier answer's
    # value and got a 2xx
    chained: set[tuple[str, str]] = field(default_factory=set)

    def merge(self, other: FuzzReport) -> None:
        """Add ``other``'s counts and findings to this report."""
        self.cases += other.cases
        for operation, counts in other.statuses.items():
            self.statuses[operation].update(counts)
        self.failures += other.failures
        self.errors += other.errors
        self.stateful_transitions += other.stateful_transitions
        self.chained |= other.chained


@pytest.fixture
def fuzz_app(settings: Settings, inference_url: str) -> FastAPI:
    """The app on the test database, with room for every job the fuzzer creates (the active
    job limit is tested elsewhere; here it would turn every later creation into a 429), and
    chat going to a real inference server."""
    changes = {"max_active_jobs_per_team": 100_000, "inference_url": inference_url}
    return create_app(settings.model_copy(update=changes))


def seed(client: TestClient, app: FastAPI, zoo: ZooPaths, adapters: Path) -> Seeded:
    """A team with a key, a model pair, files and jobs in every state a route cares about;
    the pair is the zoo's and the finished jobs hold real adapters, so chat answers."""
    team = client.post("/v1/admin/teams", json={"name": "alpha"}, headers=ADMIN).json()
    keys = f"/v1/admin/teams/{team['id']}/keys"
    key = client.post(keys, json={}, headers=ADMIN).json()["key"]
    spare = client.post(keys, json={"name": "spare"}, headers=ADMIN).json()["id"]
    pair = {"id": "tiny-chat", "aligned_model": str(zoo.aligned), "base_model": str(zoo.base)}
    assert client.post("/v1/models", json=pair, headers=ADMIN).status_code == 200

    def upload(content: bytes) -> str:
        response = client.post(
            "/v1/files",
            headers=auth(key),
            files={"file": ("train.jsonl", io.BytesIO(content), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    training = upload(jsonl(sentiment_rows(20)))
    second = upload(jsonl(sentiment_rows(20, start=40)))
    broken = upload(b'{"prompt": "p",\n')
    running = create_job(client, key, "tiny-chat", training)
    finished = finish_job(app, create_job(client, key, "tiny-chat", training))
    # A second finished job whose model is not among the ids DELETE /v1/models/{model_id}
    # draws, so its adapter is more likely to be still there when the fuzzer asks for it.
    kept = finish_job(app, create_job(client, key, "tiny-chat", training))
    for job in (finished, kept):
        install_real_adapters(job, adapters, adapters)
    waiting = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-chat", "training_file": second, "auto_start": False},
        headers=auth(key),
    ).json()["id"]
    # No worker runs: move it where a worker would, so POST .../start has a job to start.
    with app.state.sessions() as session, session.begin():
        assert transition(session, waiting, "validating_files", "validated")
    return Seeded(
        team_key=key,
        team_id=team["id"],
        spare_key_id=spare,
        files=[training, second, broken],
        jobs=[running, finished.job_id, kept.job_id, waiting],
        models=["tiny-chat", finished.model_id],
        checkpoint_step=finished.checkpoint_step,
    )


def config(seeded: Seeded, admin: bool) -> schemathesis.Config:
    """Every check, bounded examples, seeded ids; the admin routes with the admin key
    (``admin``), or the others with the team key (and the admin key for POST /v1/models)."""
    key = ADMIN_KEY if admin else seeded.team_key
    draw = {"probability": SEEDED_ID_PROBABILITY}
    semantic_checks = {
        "positive_data_acceptance": {"expected-statuses": ["2xx", 401, 404, 409, 422, 429]}
    }
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {key}"},
            # No Hypothesis database on disk, no shrinking: a CI run is bounded and leaves
            # nothing behind; the failure report carries a curl line to reproduce it.
            "generation": {
                "max-examples": EXAMPLES,
                "database": "none",
                "no-shrink": True,
                "with-security-parameters": False,
            },
            "checks": {"enabled": True},
            "dictionaries": {
                "files": {"values": seeded.files},
                "jobs": {"values": seeded.jobs},
                "models": {"values": seeded.models},
                "teams": {"values": [seeded.team_id]},
                "keys": {"values": [seeded.spare_key_id]},
                "steps": {"values": [seeded.checkpoint_step]},
            },
            "parameters": {
                "path.file_id": {"dictionary": "files", **draw},
                "path.fine_tuning_job_id": {"dictionary": "jobs", **draw},
                "path.model_id": {"dictionary": "models", **draw},
                "path.team_id": {"dictionary": "teams", **draw},
                "path.key_id": {"dictionary": "keys", **draw},
                "path.step": {"dictionary": "steps", **draw},
                "body.training_file": {"dictionary": "files", **draw},
                "body.validation_file": {"dictionary": "files", **draw},
                "body.model": {"dictionary": "models", **draw},
            },
            "operations": [
                # Selected here, not with schema.include(): an include there is widened again
                # by the per-operation entries below.
                {"include-path-regex": ADMIN_PATHS, "enabled": admin},
                {"exclude-path-regex": ADMIN_PATHS, "enabled": not admin},
                # One name per entry: several include-* keys in one entry match any of them.
                {
                    "include-name": "POST /v1/models",
                    "headers": {"Authorization": f"Bearer {ADMIN_KEY}"},
                },
                *({"include-name": name, "checks": semantic_checks} for name in SEMANTIC_422),
                # The seeded pair is a hub id the inference server cannot load (404), the
                # seeded adapter holds placeholder files (400), and a checkpoint was never
                # evaluated (403): schema-valid requests the server rightly refuses.
                {
                    "include-name": "POST /v1/chat/completions",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", 400, 401, 403, 404, 422, 429]
                        }
                    },
                },
                # Every multipart part is bytes on the wire, so a "wrong type" mutation (an
                # object for the file) arrives as the valid bytes "{}": no rejection is owed.
                # The upload's real bad inputs are in the corpus (test_bad_inputs_files.py).
                {
                    "include-name": "POST /v1/files",
                    "checks": {"negative_data_rejection": {"enabled": False}},
                },
            ],
        }
    )


def _label(case: Any) -> str:
    """``METHOD /path/{template}`` of a case or an operation, as schemathesis names them."""
    return f"{case.method.upper()} {case.path}"


def run(schema: schemathesis.BaseSchema) -> FuzzReport:
    """Run every schemathesis phase on ``schema``; collect statuses, failures and errors."""
    report = FuzzReport()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                node = recorder.cases[case_id]
                status = interaction.response.status_code if interaction.response else 0
                report.statuses[_label(node.value)][status] += 1
                report.cases += 1
                if node.parent_id in recorder.cases and 200 <= status < 300:
                    parent = recorder.cases[node.parent_id].value
                    report.chained.add((_label(parent), _label(node.value)))
            for checks in recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        report.failures.append(
                            f"[{event.phase.value}] {recorder.label}: {check.name}: "
                            f"{failure.title}: {failure.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.PhaseStarted) and isinstance(
            event.payload, events.StatefulPhasePayload
        ):
            report.stateful_transitions += event.payload.transitions_selected
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
    return report


@pytest.fixture
def fuzzed(
    fuzz_app: FastAPI, zoo: ZooPaths, tmp_path: Path
) -> Iterator[tuple[FuzzReport, set[str]]]:
    """Seed, fuzz the team routes then the admin routes; the report and every operation."""
    adapter = make_adapter(zoo, tmp_path / "adapter", seed=1)
    with TestClient(fuzz_app) as client:
        seeded = seed(client, fuzz_app, zoo, adapter)
        report = FuzzReport()
        operations: set[str] = set()
        for admin in (False, True):
            schema = schemathesis.openapi.from_asgi(
                "/openapi.json", fuzz_app, config=config(seeded, admin)
            )
            operations |= {_label(result.ok()) for result in schema.get_all_operations()}
            report.merge(run(schema))
        yield report, operations


def test_fuzzing_finds_no_server_error_and_no_schema_violation(
    fuzzed: tuple[FuzzReport, set[str]], settings: Settings
) -> None:
    report, operations = fuzzed
    print(  # the figures, for -s and the CI log
        f"fuzzing: {report.cases} cases on {len(operations)} operations, "
        f"{report.stateful_transitions} stateful transitions, "
        f"{len(report.failures)} failed checks, {len(report.errors)} errors"
    )
    summary = "\n\n".join(report.failures[:20])
    assert not report.failures, f"{len(report.failures)} failed checks:\n\n{summary}"
    assert not report.errors, report.errors
    # It really ran: every operation, a fair number of cases, stateful sequences.
    assert len(operations) > 25
    assert operations <= set(report.statuses), operations - set(report.statuses)
    assert report.cases > 20 * len(operations)
    assert report.stateful_transitions > 10
    assert all(status >= 100 for counts in report.statuses.values() for status in counts)
    never = [
        name for name in MUST_SUCCEED if not any(200 <= s < 300 for s in report.statuses[name])
    ]
    assert not never, f"never answered 2xx: {[(n, report.statuses[n]) for n in never]}"
    # Stateful sequences fed what one answer created into the next request, which succeeded.
    # Which links the stateful phase follows depends on what ran before it in the process
    # (in a full run, chains from POST /v1/files and POST jobs were sometimes not drawn).
    assert report.chained, "no stateful sequence succeeded"
    # Nothing half-written: no upload's temporary file survived the fuzzing.
    leftovers = list(Path(settings.resolved_artifact_dir).rglob(".upload-*"))
    assert leftovers == []
