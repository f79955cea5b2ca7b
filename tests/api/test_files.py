"""``/v1/files``: upload, read, list, delete, and what a team can see of another's files."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.api.conftest import auth, jsonl, sentiment_rows

Upload = Callable[..., dict[str, Any]]


def stored_files(app: FastAPI) -> list[str]:
    """Every file in the artifact store (temporary ones included), relative to its root."""
    root: Path = app.state.store.root
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def create_job(client: TestClient, key: str, model: str, training_file: str, **extra: Any) -> str:
    """Create a job through the API; returns its id."""
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model, "training_file": training_file, **extra},
        headers=auth(key),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize(
    ("rows", "row_format"),
    [
        (sentiment_rows(12), "prompt_completion"),
        (
            [
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Say {i}."},
                        {"role": "assistant", "content": f"{i}"},
                    ]
                }
                for i in range(12)
            ],
            "chat",
        ),
        (
            [{"instruction": "Add one.", "input": f"{i}", "output": f"{i + 1}"} for i in range(12)],
            "instruction",
        ),
    ],
    ids=["prompt_completion", "chat", "instruction"],
)
def test_upload_describes_the_stored_file(
    client: TestClient,
    app: FastAPI,
    team_key: str,
    rows: list[dict[str, Any]],
    row_format: str,
) -> None:
    content = jsonl(rows)
    before = int(time.time())
    response = client.post(
        "/v1/files",
        headers=auth(team_key),
        files={"file": ("train.jsonl", io.BytesIO(content), "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["status"] == "processed"
    assert body["status_details"] is None
    assert body["format"] == row_format
    assert body["num_examples"] == 12
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert isinstance(body["created_at"], int)
    assert before <= body["created_at"] <= int(time.time())
    assert stored_files(app) == [f"files/{body['id']}.jsonl"]


def test_a_file_breaking_the_rules_is_stored_with_status_error(
    client: TestClient, app: FastAPI, team_key: str, upload: Upload
) -> None:
    content = jsonl(sentiment_rows(2)) + b'{"prompt": "broken\n' + jsonl(sentiment_rows(1))
    body = upload(team_key, content)
    assert body["status"] == "error"
    assert "line 3" in body["status_details"]
    assert "invalid JSON" in body["status_details"]
    assert body["format"] is None
    assert body["num_examples"] is None
    # The bytes are kept as uploaded, so the team can read back what it sent.
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert stored_files(app) == [f"files/{body['id']}.jsonl"]
    fetched = client.get(f"/v1/files/{body['id']}", headers=auth(team_key))
    assert fetched.json() == body


def test_get_one_file_answers_what_the_upload_answered(
    client: TestClient, team_key: str, upload: Upload
) -> None:
    body = upload(team_key, jsonl(sentiment_rows(3)))
    response = client.get(f"/v1/files/{body['id']}", headers=auth(team_key))
    assert response.status_code == 200
    assert response.json() == body


def test_content_round_trips_the_exact_bytes(
    client: TestClient, team_key: str, upload: Upload
) -> None:
    # CRLF line ends, non-ASCII text, a blank line and no final newline: nothing is normalised.
    content = (
        b'{"prompt": "caf\xc3\xa9 \\u2603", "completion": "ok"}\r\n\r\n'
        b'{"prompt": "two", "completion": "\xe2\x98\x83"}'
    )
    body = upload(team_key, content, "data.jsonl")
    assert body["status"] == "processed", body
    response = client.get(f"/v1/files/{body['id']}/content", headers=auth(team_key))
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["x-content-sha256"] == hashlib.sha256(content).hexdigest()
    assert response.headers["content-type"] == "application/octet-stream"
    assert 'filename="data.jsonl"' in response.headers["content-disposition"]


def test_list_is_newest_first_and_paginates(
    client: TestClient, team_key: str, upload: Upload
) -> None:
    uploaded = [upload(team_key, jsonl(sentiment_rows(2, start=i)))["id"] for i in range(5)]
    full = client.get("/v1/files", headers=auth(team_key)).json()
    assert full["object"] == "list"
    assert full["has_more"] is False
    assert sorted(item["id"] for item in full["data"]) == sorted(uploaded)
    # Timestamps are whole seconds, so files of the same second are ordered by id (descending).
    keys = [(item["created_at"], item["id"]) for item in full["data"]]
    assert keys == sorted(keys, reverse=True)
    assert full["first_id"] == full["data"][0]["id"]
    assert full["last_id"] == full["data"][-1]["id"]

    pages: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(5):  # bounded: 3 pages are expected
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/files", params=params, headers=auth(team_key)).json()
        pages.append(page)
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [len(page["data"]) for page in pages] == [2, 2, 1]
    assert [page["has_more"] for page in pages] == [True, True, False]
    for page in pages:
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
    paged = [item["id"] for page in pages for item in page["data"]]
    assert paged == [item["id"] for item in full["data"]]


def test_a_later_upload_is_listed_first(client: TestClient, team_key: str, upload: Upload) -> None:
    older = upload(team_key, jsonl(sentiment_rows(2)))
    # created_at has one-second resolution: wait for the next second (bounded).
    deadline = time.monotonic() + 3
    while int(time.time()) <= older["created_at"] and time.monotonic() < deadline:
        time.sleep(0.05)
    newer = upload(team_key, jsonl(sentiment_rows(2, start=2)))
    assert newer["created_at"] > older["created_at"]
    listed = client.get("/v1/files", headers=auth(team_key)).json()
    assert [item["id"] for item in listed["data"]] == [newer["id"], older["id"]]


def test_list_of_a_team_without_files_is_empty(client: TestClient, team_key: str) -> None:
    listed = client.get("/v1/files", headers=auth(team_key)).json()
    assert listed == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }


def test_list_filters_by_purpose(client: TestClient, team_key: str, upload: Upload) -> None:
    body = upload(team_key, jsonl(sentiment_rows(2)))
    matching = client.get("/v1/files?purpose=fine-tune", headers=auth(team_key)).json()
    assert [item["id"] for item in matching["data"]] == [body["id"]]
    other = client.get("/v1/files?purpose=assistants", headers=auth(team_key)).json()
    assert other["data"] == []


def test_delete_removes_row_and_bytes(
    client: TestClient, app: FastAPI, team_key: str, upload: Upload
) -> None:
    kept = upload(team_key, jsonl(sentiment_rows(2)))
    body = upload(team_key, jsonl(sentiment_rows(2, start=2)))
    deleted = client.delete(f"/v1/files/{body['id']}", headers=auth(team_key))
    assert deleted.status_code == 200
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    for method, url in (
        ("GET", f"/v1/files/{body['id']}"),
        ("GET", f"/v1/files/{body['id']}/content"),
        ("DELETE", f"/v1/files/{body['id']}"),
    ):
        response = client.request(method, url, headers=auth(team_key))
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "file_not_found"
    assert stored_files(app) == [f"files/{kept['id']}.jsonl"]
    listed = client.get("/v1/files", headers=auth(team_key)).json()
    assert [item["id"] for item in listed["data"]] == [kept["id"]]


@pytest.mark.parametrize("role", ["training_file", "validation_file"])
def test_a_file_used_by_an_unfinished_job_cannot_be_deleted(
    client: TestClient,
    app: FastAPI,
    team_key: str,
    upload: Upload,
    training_file: str,
    model_pair: str,
    role: str,
) -> None:
    validation_file = upload(team_key, jsonl(sentiment_rows(4, start=100)))["id"]
    job_id = create_job(
        client, team_key, model_pair, training_file, validation_file=validation_file
    )
    used = training_file if role == "training_file" else validation_file
    refused = client.delete(f"/v1/files/{used}", headers=auth(team_key))
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "file_in_use"
    assert error["type"] == "conflict_error"
    assert job_id in error["message"]
    # Nothing was removed: the row and the bytes are both still there.
    assert client.get(f"/v1/files/{used}", headers=auth(team_key)).status_code == 200
    content = client.get(f"/v1/files/{used}/content", headers=auth(team_key))
    assert content.status_code == 200
    assert f"files/{used}.jsonl" in stored_files(app)

    # Once the job is finished (cancelled here), the file can go; the job keeps its record.
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(team_key))
    assert cancelled.status_code == 200, cancelled.text
    assert client.delete(f"/v1/files/{used}", headers=auth(team_key)).status_code == 200
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth(team_key)).json()
    assert job[role] == used


def test_a_purpose_other_than_fine_tune_is_refused(
    client: TestClient, app: FastAPI, team_key: str
) -> None:
    response = client.post(
        "/v1/files",
        headers=auth(team_key),
        files={"file": ("train.jsonl", io.BytesIO(jsonl(sentiment_rows(2))), "application/jsonl")},
        data={"purpose": "assistants"},
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_purpose"
    assert error["param"] == "purpose"
    assert stored_files(app) == []
    assert client.get("/v1/files", headers=auth(team_key)).json()["data"] == []


@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("a\\b.jsonl", "b.jsonl"),
        ("/abs/path/train.jsonl", "train.jsonl"),
        ("C:\\Users\\me\\train.jsonl", "train.jsonl"),
        ("..", "upload.jsonl"),
        ("dir/..", "upload.jsonl"),
    ],
)
def test_path_like_filenames_never_reach_the_store(
    client: TestClient,
    app: FastAPI,
    tmp_path: Path,
    team_key: str,
    upload: Upload,
    filename: str,
    shown: str,
) -> None:
    content = jsonl(sentiment_rows(2))
    body = upload(team_key, content, filename)
    assert body["filename"] == shown
    assert "/" not in body["filename"]
    assert "\\" not in body["filename"]
    assert stored_files(app) == [f"files/{body['id']}.jsonl"]
    # Nothing was written beside the store either (a "passwd" two levels up, say).
    outside = [
        path
        for path in tmp_path.rglob("*")
        if path.is_file() and path.name in {shown, Path(filename).name, "passwd"}
    ]
    assert outside == []
    response = client.get(f"/v1/files/{body['id']}/content", headers=auth(team_key))
    assert response.content == content


def test_another_teams_file_is_not_found(
    client: TestClient,
    app: FastAPI,
    make_team: Callable[[str], tuple[str, str]],
    upload: Upload,
) -> None:
    _, alpha = make_team("alpha")
    _, beta = make_team("beta")
    content = jsonl(sentiment_rows(2))
    body = upload(alpha, content)
    for method, url in (
        ("GET", f"/v1/files/{body['id']}"),
        ("GET", f"/v1/files/{body['id']}/content"),
        ("DELETE", f"/v1/files/{body['id']}"),
    ):
        response = client.request(method, url, headers=auth(beta))
        assert response.status_code == 404, (method, url)
        error = response.json()["error"]
        assert error["code"] == "file_not_found"
        assert content.decode() not in response.text
    assert client.get("/v1/files", headers=auth(beta)).json()["data"] == []
    cursor = client.get(f"/v1/files?after={body['id']}", headers=auth(beta))
    assert cursor.status_code == 404
    assert cursor.json()["error"]["code"] == "invalid_cursor"
    # The owner still has it, bytes and all.
    assert client.get(f"/v1/files/{body['id']}/content", headers=auth(alpha)).content == content
    assert stored_files(app) == [f"files/{body['id']}.jsonl"]


def test_bytes_whose_row_cannot_be_written_are_removed(
    app: FastAPI, database_url: str, team_key: str
) -> None:
    """A database failure at the commit leaves no orphaned bytes and no 200."""
    # A real failure from the database itself: a trigger that refuses every new file row; on
    # PostgreSQL a deferred one, so it fires at COMMIT, after the route has built its answer.
    with app.state.engine.begin() as connection:
        if database_url.startswith("sqlite"):
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_files BEFORE INSERT ON files "
                    "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION refuse_files() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'refused by test'; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER refuse_files AFTER INSERT ON files "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_files()"
                )
            )
    with TestClient(app, raise_server_exceptions=False) as failing:
        response = failing.post(
            "/v1/files",
            headers=auth(team_key),
            files={"file": ("t.jsonl", io.BytesIO(jsonl(sentiment_rows(2))), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        listed = failing.get("/v1/files", headers=auth(team_key))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert stored_files(app) == []
    assert listed.json()["data"] == []
