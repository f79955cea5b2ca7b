"""The safety scan's API surface and data policies: what a file and a job show, bad values.

The scans themselves run in the worker (tests/worker/test_scan.py); here no worker runs, so
a valid upload stays ``pending``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows


def test_a_valid_upload_waits_for_its_scan_and_an_invalid_one_is_not_scanned(
    client: TestClient, team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    valid = upload(team_key, jsonl(sentiment_rows(20)))
    assert valid["safety_scan"] == {
        "object": "file.safety_scan",
        "status": "pending",
        "rows_scanned": 0,
        "rows_flagged": 0,
        "flagged_share": None,
        "per_category": {},
        "details": None,
        "flagged": [],
    }
    invalid = upload(team_key, b'{"prompt": "only a prompt"}\n')
    assert invalid["status"] == "error"
    assert invalid["safety_scan"]["status"] == "skipped"
    page = client.get(f"/v1/files/{valid['id']}/safety_scan", headers=auth(team_key))
    assert page.status_code == 200
    assert page.json()["file_id"] == valid["id"]
    assert page.json()["data"] == [] and page.json()["has_more"] is False


def test_another_teams_scan_is_a_404_and_bad_paging_a_422(
    client: TestClient,
    team_key: str,
    make_team: Callable[[str], tuple[str, str]],
    upload: Callable[..., dict[str, Any]],
) -> None:
    file_id = upload(team_key, jsonl(sentiment_rows(20)))["id"]
    _, other_key = make_team("beta")
    missing = client.get(f"/v1/files/{file_id}/safety_scan", headers=auth(other_key))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found"
    for query in ("after=-1", "limit=0", "limit=1001", "after=x", f"after={2**63}"):
        answer = client.get(f"/v1/files/{file_id}/safety_scan?{query}", headers=auth(team_key))
        assert answer.status_code == 422, query


def _create(
    client: TestClient, key: str, training_file: str, **fields: Any
) -> tuple[int, dict[str, Any]]:
    body = {"model": "tiny-chat", "training_file": training_file, **fields}
    response = client.post("/v1/fine_tuning/jobs", json=body, headers=auth(key))
    return response.status_code, response.json()


@pytest.mark.parametrize(
    "policy",
    [
        {"mode": "bogus"},
        {"mode": "refuse", "max_flagged_share": 1.5},
        {"mode": "refuse", "max_flagged_share": -0.1},
        {"mode": "refuse", "max_flagged_share": "0.1"},
        {"mode": "flag", "extra": 1},
        "drop_flagged",
    ],
)
def test_bad_data_policies_are_refused_with_a_422(
    client: TestClient, team_key: str, model_pair: str, training_file: str, policy: Any
) -> None:
    status, body = _create(client, team_key, training_file, data_policy=policy)
    assert status == 422, body
    assert "data_policy" in (body["error"]["param"] or ""), body


def test_a_job_takes_its_own_policy_else_its_teams_else_flag(
    client: TestClient,
    team_key: str,
    make_team: Callable[[str], tuple[str, str]],
    model_pair: str,
    training_file: str,
) -> None:
    status, job = _create(client, team_key, training_file)
    assert status == 200
    assert job["data_policy"] == {"mode": "flag", "max_flagged_share": 0.0}
    status, job = _create(client, team_key, training_file, data_policy={"mode": "drop_flagged"})
    assert job["data_policy"] == {"mode": "drop_flagged", "max_flagged_share": 0.0}

    team_id = client.get("/v1/admin/teams", headers=ADMIN).json()["data"][0]["id"]
    policy = {"mode": "refuse", "max_flagged_share": 0.02}
    patched = client.patch(
        f"/v1/admin/teams/{team_id}", json={"data_policy": policy}, headers=ADMIN
    )
    assert patched.status_code == 200 and patched.json()["data_policy"] == policy
    status, job = _create(client, team_key, training_file)
    assert status == 200 and job["data_policy"] == policy
    bad = client.patch(
        f"/v1/admin/teams/{team_id}", json={"data_policy": {"mode": "nope"}}, headers=ADMIN
    )
    assert bad.status_code == 422
    reset = client.patch(f"/v1/admin/teams/{team_id}", json={"data_policy": None}, headers=ADMIN)
    assert reset.json()["data_policy"] is None
