"""A corpus of bad requests and bad datasets for ``/v1/files``: each gets its exact status and
error code in the envelope, never a 5xx.

Datasets that break a format rule are stored (status ``error``, with the line); a job created
with one answers 422 with the same code and line. Requests walk every parameter: the file part,
``purpose``, multipart oddities (a field twice, an unknown field, a part without a name, no
closing boundary, other encodings of the form), keys, and the list's ``limit``, ``after`` and
``purpose``; a refused one leaves no row, no bytes and no temporary file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.db.models import File, Job
from service.settings import Settings
from tests.api import corpus
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows

VALID_ROW = b'{"prompt": "p", "completion": "c"}\n'


# --- Datasets that are stored with status "error" -------------------------------------------


def chat(*messages: tuple[str, str]) -> dict[str, Any]:
    """A chat row from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


@dataclass(frozen=True)
class BadDataset:
    """A dataset that breaks a format rule: the code and line the service must report."""

    content: bytes
    code: str
    line: int | None


LONG_LINE = ('{"prompt": "' + "a" * 1_000_000 + '", "completion": "c"}\n').encode()
BAD_DATASETS = {
    "broken_json_line_3": BadDataset(
        jsonl(sentiment_rows(2)) + b'{"prompt": "p",\n', "invalid_json", 3
    ),
    "json_array_per_line": BadDataset(b'["p", "c"]\n' + VALID_ROW, "invalid_row", 1),
    "json_string_per_line": BadDataset(VALID_ROW + b'"just text"\n', "invalid_row", 2),
    "no_assistant_message": BadDataset(
        jsonl([chat(("system", "s"), ("user", "hi"))]), "missing_assistant", 1
    ),
    "assistant_weight_zero": BadDataset(
        jsonl(
            [
                chat(("user", "hi"), ("assistant", "yo")),
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "no", "weight": 0},
                    ]
                },
            ]
        ),
        "missing_assistant",
        2,
    ),
    "last_message_not_assistant": BadDataset(
        jsonl([chat(("user", "a"), ("assistant", "b"), ("user", "c"))]), "invalid_row", 1
    ),
    "messages_not_a_list": BadDataset(jsonl([{"messages": "hi"}]), "invalid_row", 1),
    "unknown_role": BadDataset(
        jsonl([chat(("user", "a"), ("assistant", "b")), chat(("robot", "a"), ("assistant", "b"))]),
        "invalid_role",
        2,
    ),
    "mixed_formats": BadDataset(
        jsonl([*sentiment_rows(2), chat(("user", "a"), ("assistant", "b"))]), "mixed_formats", 3
    ),
    "prompt_is_a_number": BadDataset(jsonl([{"prompt": 42, "completion": "c"}]), "invalid_row", 1),
    "empty_completion": BadDataset(
        jsonl([{"prompt": "p", "completion": "  "}]), "empty_content", 1
    ),
    "unknown_keys": BadDataset(
        VALID_ROW + b'{"question": "q", "answer": "a"}\n', "unknown_format", 2
    ),
    "nul_in_a_key": BadDataset(VALID_ROW + b'{"a\\u0000b": 1}\n', "unknown_format", 2),
    "line_over_1_mb": BadDataset(VALID_ROW + LONG_LINE, "line_too_long", 2),
    "binary_garbage": BadDataset(bytes(range(128, 256)) * 4, "invalid_encoding", 1),
    "latin_1_text": BadDataset(
        VALID_ROW + b'{"prompt": "caf\xe9", "completion": "c"}\n', "invalid_encoding", 2
    ),
    "blank_lines_count": BadDataset(VALID_ROW + b"\n   \n" + b"{oops}\n", "invalid_json", 4),
    "empty_file": BadDataset(b"", "empty_file", None),
    "only_blank_lines": BadDataset(b"\n\n  \n\t\n", "empty_file", None),
}


@pytest.mark.parametrize("case", BAD_DATASETS.values(), ids=BAD_DATASETS.keys())
def test_a_bad_dataset_is_stored_with_its_error_and_refused_by_jobs(
    world: World, case: BadDataset
) -> None:
    client, team = world.client, world.keys["team"]
    uploaded = client.post(
        "/v1/files",
        headers=team,
        files={"file": ("train.jsonl", io.BytesIO(case.content), "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert body["status"] == "error"
    assert body["bytes"] == len(case.content)
    assert body["format"] is None
    details = body["status_details"]
    assert "\x00" not in details
    if case.line is not None:
        assert details.startswith(f"line {case.line}: "), details
    else:
        assert "line" not in details
        assert details == "the file holds no examples"
    with corpus.unchanged(lambda: corpus.row_counts(world.app, Job)):
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": world.model, "training_file": body["id"]},
            headers=team,
        )
        error = corpus.assert_envelope(job, 422, case.code, param="training_file")
        assert error["message"] == f"training_file: {details}"


def test_a_bad_validation_file_is_refused_with_its_line(
    client: TestClient,
    team_key: str,
    upload: Callable[..., dict[str, Any]],
    training_file: str,
    model_pair: str,
) -> None:
    bad = upload(team_key, VALID_ROW + b"[1, 2]\n")
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model_pair, "training_file": training_file, "validation_file": bad["id"]},
        headers=auth(team_key),
    )
    error = corpus.assert_envelope(job, 422, "invalid_row")
    assert error["param"] == "validation_file"
    assert "line 2" in error["message"]


def test_a_long_status_detail_is_bounded(
    team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    # unknown_format lists the row's keys: 50,000 of them must not become a 500 kB detail.
    row = json.dumps({f"key{i}": 0 for i in range(50_000)}).encode() + b"\n"
    body = upload(team_key, row)
    assert body["status_details"].startswith("line 1: row has none of the keys")
    assert len(body["status_details"]) <= 2000


def test_deeply_nested_json_is_an_invalid_json_line(
    client: TestClient, team_key: str, upload: Callable[..., dict[str, Any]]
) -> None:
    body = upload(team_key, VALID_ROW + b'{"prompt": ' + b"[" * 100_000 + b"\n")
    assert body["status"] == "error"
    assert body["status_details"].startswith("line 2: ")


# --- Requests refused outright ------------------------------------------------------------

MULTIPART = "multipart/form-data; boundary=zz"


def form_part(name: bytes, value: bytes, filename: bytes | None = None) -> bytes:
    """One part of a multipart body with boundary ``zz`` (a file part when ``filename``)."""
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return b"--zz\r\n" + disposition + b"\r\n\r\n" + value + b"\r\n"


def multipart(*parts: bytes) -> bytes:
    """Parts and the closing boundary."""
    return b"".join(parts) + b"--zz--\r\n"


PURPOSE = form_part(b"purpose", b"fine-tune")
FILE = form_part(b"file", VALID_ROW, b"train.jsonl")


def raw_multipart(filename: bytes, content: bytes, purpose: bytes = b"fine-tune") -> bytes:
    """A multipart body written by hand (httpx would percent-encode odd filenames)."""
    return (
        b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--zz--\r\n"
    )


@dataclass(frozen=True)
class BadRequest:
    """A request and the status, error code and param it must get.

    ``key`` is which credential goes in the Authorization header: the team's own key
    ("team"), none, a made-up one, a revoked one, the admin key, or a Basic header.
    """

    method: str
    url: str
    status: int
    code: str
    param: str | None = None
    key: str = "team"
    files: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def good_file() -> dict[str, Any]:
    """A valid file part."""
    return {"file": ("train.jsonl", io.BytesIO(VALID_ROW), "application/jsonl")}


def with_purpose(status: int, code: str, purpose: str) -> BadRequest:
    """A ``POST /v1/files`` of a valid file with this ``purpose``."""
    data = {"purpose": purpose}
    return BadRequest("POST", "/v1/files", status, code, "purpose", files=good_file(), data=data)


def handmade(status: int, code: str, param: str | None, content: bytes) -> BadRequest:
    """A ``POST /v1/files`` of a multipart body written by hand (boundary ``zz``)."""
    headers = {"Content-Type": MULTIPART}
    return BadRequest("POST", "/v1/files", status, code, param, content=content, headers=headers)


FINE_TUNE = {"purpose": "fine-tune"}
BAD_REQUESTS = {
    "missing_file_part": BadRequest(
        "POST", "/v1/files", 422, "invalid_request", "file", data=FINE_TUNE
    ),
    "file_sent_as_a_plain_field": BadRequest(
        "POST",
        "/v1/files",
        422,
        "invalid_request",
        "file",
        data={**FINE_TUNE, "file": "not a file"},
    ),
    "missing_purpose": BadRequest(
        "POST", "/v1/files", 422, "invalid_request", "purpose", files=good_file()
    ),
    "empty_purpose": with_purpose(422, "invalid_request", ""),
    "wrong_purpose": with_purpose(422, "invalid_purpose", "assistants"),
    "purpose_in_other_case": with_purpose(422, "invalid_purpose", "Fine-Tune"),
    "json_body_instead_of_multipart": BadRequest(
        "POST",
        "/v1/files",
        422,
        "invalid_request",
        "file",
        content=b'{"purpose": "fine-tune"}',
        headers={"Content-Type": "application/json"},
    ),
    "multipart_without_boundary": BadRequest(
        "POST",
        "/v1/files",
        400,
        "invalid_body",
        content=b"--zz\r\n",
        headers={"Content-Type": "multipart/form-data"},
    ),
    "garbled_multipart": handmade(400, "invalid_body", None, b"this is not multipart"),
    "malformed_content_length": BadRequest(
        "POST",
        "/v1/files",
        400,
        "invalid_content_length",
        content=raw_multipart(b"t.jsonl", VALID_ROW),
        headers={"Content-Type": MULTIPART, "Content-Length": "12abc"},
    ),
    "negative_content_length": BadRequest(
        "GET", "/v1/files", 400, "invalid_content_length", headers={"Content-Length": "-1"}
    ),
    "no_authorization_header": BadRequest(
        "POST", "/v1/files", 401, "missing_api_key", key="none", files=good_file(), data=FINE_TUNE
    ),
    "basic_instead_of_bearer": BadRequest("GET", "/v1/files", 401, "missing_api_key", key="basic"),
    "empty_bearer_token": BadRequest("GET", "/v1/files", 401, "missing_api_key", key="empty"),
    "wrong_key": BadRequest(
        "POST", "/v1/files", 401, "invalid_api_key", key="wrong", files=good_file(), data=FINE_TUNE
    ),
    "revoked_key": BadRequest(
        "POST",
        "/v1/files",
        401,
        "invalid_api_key",
        key="revoked",
        files=good_file(),
        data=FINE_TUNE,
    ),
    "admin_key_is_not_a_team_key": BadRequest(
        "GET", "/v1/files", 401, "invalid_api_key", key="admin"
    ),
    "limit_zero": BadRequest("GET", "/v1/files?limit=0", 422, "invalid_request", "limit"),
    "limit_1000": BadRequest("GET", "/v1/files?limit=1000", 422, "invalid_request", "limit"),
    "limit_not_a_number": BadRequest("GET", "/v1/files?limit=ten", 422, "invalid_request", "limit"),
    "after_unknown_id": BadRequest(
        "GET", "/v1/files?after=file-doesnotexist", 404, "invalid_cursor", "after"
    ),
    "after_too_long": BadRequest(
        "GET", "/v1/files?after=" + "f" * 65, 422, "invalid_request", "after"
    ),
    "after_with_a_nul": BadRequest(
        "GET", "/v1/files?after=file-%00x", 422, "invalid_request", "after"
    ),
    "purpose_filter_with_a_nul": BadRequest(
        "GET", "/v1/files?purpose=fine%00tune", 422, "invalid_request", "purpose"
    ),
    "unknown_file": BadRequest(
        "GET", "/v1/files/file-doesnotexist", 404, "file_not_found", "file_id"
    ),
    "unknown_file_content": BadRequest(
        "GET", "/v1/files/file-doesnotexist/content", 404, "file_not_found", "file_id"
    ),
    "delete_unknown_file": BadRequest(
        "DELETE", "/v1/files/file-doesnotexist", 404, "file_not_found", "file_id"
    ),
    "file_id_with_a_nul": BadRequest(
        "GET", "/v1/files/file-%00x", 404, "file_not_found", "file_id"
    ),
    "file_id_with_a_newline": BadRequest(
        "GET", "/v1/files/file-x%0A/content", 404, "file_not_found", "file_id"
    ),
    "delete_file_id_with_a_nul": BadRequest(
        "DELETE", "/v1/files/%00", 404, "file_not_found", "file_id"
    ),
    "put_is_not_allowed": BadRequest("PUT", "/v1/files", 405, "method_not_allowed"),
    # -- multipart oddities: nothing is silently dropped or guessed --
    "purpose_given_twice": handmade(
        422,
        "invalid_request",
        "purpose",
        multipart(PURPOSE, form_part(b"purpose", b"assistants"), FILE),
    ),
    "two_file_parts": handmade(
        422,
        "invalid_request",
        "file",
        multipart(PURPOSE, FILE, form_part(b"file", VALID_ROW * 2, b"more.jsonl")),
    ),
    "unknown_field": handmade(
        422,
        "invalid_request",
        "expires_after",
        multipart(PURPOSE, FILE, form_part(b"expires_after", b"3600")),
    ),
    "unknown_file_part": handmade(
        422,
        "invalid_request",
        "validation",
        multipart(PURPOSE, FILE, form_part(b"validation", VALID_ROW, b"v.jsonl")),
    ),
    "purpose_sent_as_a_file": handmade(
        422,
        "invalid_request",
        "purpose",
        multipart(form_part(b"purpose", b"fine-tune", b"purpose.txt"), FILE),
    ),
    "part_without_a_name": handmade(
        400,
        "invalid_body",
        None,
        multipart(PURPOSE, b"--zz\r\nContent-Type: text/plain\r\n\r\nx\r\n"),
    ),
    "no_closing_boundary": handmade(422, "invalid_request", "file", PURPOSE + FILE),
    "empty_multipart_body": handmade(422, "invalid_request", "file", b""),
    "over_1000_fields": handmade(
        400,
        "invalid_body",
        None,
        multipart(PURPOSE, FILE, *(form_part(b"f%d" % i, b"x") for i in range(1001))),
    ),
    "urlencoded_form": BadRequest(
        "POST",
        "/v1/files",
        422,
        "invalid_request",
        "file",
        content=b"purpose=fine-tune&file=" + VALID_ROW.strip(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    "dataset_sent_as_the_body": BadRequest(
        "POST",
        "/v1/files",
        422,
        "invalid_request",
        "file",
        content=VALID_ROW,
        headers={"Content-Type": "application/jsonl"},
    ),
    "purpose_very_long": with_purpose(422, "invalid_purpose", "fine-tune" * 10_000),
    "purpose_with_a_nul": handmade(
        422, "invalid_purpose", "purpose", multipart(form_part(b"purpose", b"fine-tune\x00"), FILE)
    ),
    "purpose_not_utf8": handmade(
        422, "invalid_purpose", "purpose", multipart(form_part(b"purpose", b"fine-\xfftune"), FILE)
    ),
    # -- list parameters --
    "limit_negative": BadRequest("GET", "/v1/files?limit=-1", 422, "invalid_request", "limit"),
    "limit_101": BadRequest("GET", "/v1/files?limit=101", 422, "invalid_request", "limit"),
    "limit_fractional": BadRequest("GET", "/v1/files?limit=1.5", 422, "invalid_request", "limit"),
    "limit_empty": BadRequest("GET", "/v1/files?limit=", 422, "invalid_request", "limit"),
    "limit_huge": BadRequest("GET", "/v1/files?limit=" + "9" * 40, 422, "invalid_request", "limit"),
    "limit_twice_last_wins_and_is_checked": BadRequest(
        "GET", "/v1/files?limit=5&limit=1000", 422, "invalid_request", "limit"
    ),
    "after_empty": BadRequest("GET", "/v1/files?after=", 422, "invalid_request", "after"),
    "after_with_a_slash": BadRequest(
        "GET", "/v1/files?after=file-a/b", 422, "invalid_request", "after"
    ),
    "purpose_filter_in_capitals": BadRequest(
        "GET", "/v1/files?purpose=Fine-Tune", 422, "invalid_request", "purpose"
    ),
    "purpose_filter_too_long": BadRequest(
        "GET", "/v1/files?purpose=" + "a" * 33, 422, "invalid_request", "purpose"
    ),
    "file_id_too_long": BadRequest(
        "GET", "/v1/files/file-" + "a" * 1000, 404, "file_not_found", "file_id"
    ),
    "file_id_not_utf8": BadRequest("GET", "/v1/files/file-%FF", 404, "file_not_found", "file_id"),
}


@dataclass(frozen=True)
class World:
    """One app per database for the module's corpora: a refused request stores nothing (each
    case checks that), so the cases can share it, and they run in seconds."""

    app: FastAPI
    client: TestClient
    settings: Settings
    keys: dict[str, dict[str, str]]
    """Authorization headers by name: the team's key, a revoked key of the same team, others."""
    model: str


@pytest.fixture(scope="module", params=corpus.DATABASES)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Team alpha with a key and a revoked one, and a registered model pair."""
    for app, client, settings, _ in corpus.shared_app(request, tmp_path_factory, "files-corpus"):
        team, key = corpus.create_team(client, "alpha")
        keys = f"/v1/admin/teams/{team['id']}/keys"
        revoked = client.post(keys, json={}, headers=ADMIN).json()
        assert client.delete(f"{keys}/{revoked['id']}", headers=ADMIN).status_code == 200
        corpus.register_pair(
            client, {"id": "tiny-chat", "aligned_model": "org/a", "base_model": "org/b"}
        )
        yield World(
            app,
            client,
            settings,
            {
                "team": auth(key["key"]),
                "none": {},
                "wrong": auth("asft-" + "x" * 43),
                "revoked": auth(revoked["key"]),
                "admin": ADMIN,
                "basic": {"Authorization": "Basic YWxwaGE6c2VjcmV0"},
                "empty": {"Authorization": "Bearer  "},
            },
            "tiny-chat",
        )


def stored(world: World) -> tuple[dict[str, int], set[str]]:
    """File rows, job rows and every file under the artifact folder."""
    root = world.settings.resolved_artifact_dir
    files = {str(path) for path in root.rglob("*") if path.is_file()}
    return corpus.row_counts(world.app, File, Job), files


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_gets_its_status_and_code(world: World, case: BadRequest) -> None:
    # Nothing was stored by a refused request: no row, no bytes, no temporary file.
    with corpus.unchanged(lambda: stored(world)):
        response = world.client.request(
            case.method,
            case.url,
            headers={**world.keys[case.key], **case.headers},
            files=case.files,
            data=case.data,
            content=case.content,
        )
        corpus.assert_envelope(response, case.status, case.code, param=case.param)
        if case.status == 401:
            assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_worked_before_it_was_revoked(
    client: TestClient, make_team: Callable[[str], tuple[str, str]]
) -> None:
    team_id, key = make_team("alpha")
    assert client.get("/v1/files", headers=auth(key)).status_code == 200
    keys = client.get(f"/v1/admin/teams/{team_id}/keys", headers=ADMIN).json()["data"]
    revoked = client.delete(f"/v1/admin/teams/{team_id}/keys/{keys[0]['id']}", headers=ADMIN)
    assert revoked.json()["revoked_at"] is not None
    corpus.assert_envelope(client.get("/v1/files", headers=auth(key)), 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        (b"a\x00b.jsonl", "ab.jsonl"),
        (b"a\x01\x1fb.jsonl", "ab.jsonl"),
        (b"\x00", "upload.jsonl"),
        ("caf\u00e9.jsonl".encode(), "caf\u00e9.jsonl"),
        (b"x" * 400 + b".jsonl", "x" * 255),
    ],
    ids=["nul", "control_characters", "only_a_nul", "utf8", "too_long"],
)
def test_an_odd_filename_is_stored_cleaned(world: World, filename: bytes, shown: str) -> None:
    client, team = world.client, world.keys["team"]
    response = client.post(
        "/v1/files",
        headers={**team, "Content-Type": MULTIPART},
        content=raw_multipart(filename, VALID_ROW),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == shown
    assert body["status"] == "processed"
    assert client.get(f"/v1/files/{body['id']}", headers=team).json() == body
    content = client.get(f"/v1/files/{body['id']}/content", headers=team)
    assert content.content == VALID_ROW
