"""The OpenAPI document: every /v1 endpoint, its error answers in the one envelope, and request
bodies with examples that the service really accepts."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import BaseModel

from api.main import create_app
from api.schemas.admin import TeamCreate
from api.schemas.common import ErrorResponse
from api.schemas.jobs import JobCreate
from api.schemas.models import ModelPairCreate
from service.settings import Settings
from tests.api.conftest import ADMIN, ADMIN_KEY, auth

ERROR_REF = "#/components/schemas/ErrorResponse"
JOB = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
# Error answers beyond 401, 422 and (routes with ids) 404 that a route must document.
REQUIRED_ERRORS: dict[tuple[str, str], set[str]] = {
    ("post", "/v1/files"): {"413"},
    ("delete", "/v1/files/{file_id}"): {"409"},
    ("post", "/v1/fine_tuning/jobs"): {"404", "409", "429"},
    ("post", f"{JOB}/cancel"): {"409"},
    ("post", f"{JOB}/start"): {"409"},
    ("get", f"{JOB}/report"): {"409"},
    ("get", f"{JOB}/adapter"): {"409"},
    ("post", "/v1/models"): {"409"},
    ("post", "/v1/admin/teams"): {"409"},
}
BODIES_WITH_EXAMPLES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/fine_tuning/jobs"): JobCreate,
    ("post", "/v1/models"): ModelPairCreate,
    ("post", "/v1/admin/teams"): TeamCreate,
}


@pytest.fixture(scope="module")
def spec_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """An app whose database is never touched: the document does not depend on it."""
    data_dir = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(_env_file=None, data_dir=data_dir, admin_key=ADMIN_KEY))


@pytest.fixture(scope="module")
def spec(spec_app: FastAPI) -> dict[str, Any]:
    """The served /openapi.json."""
    with TestClient(spec_app) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        if path.startswith("/v1")
        for method, operation in item.items()
    }


def _schema(spec: dict[str, Any], ref: str) -> dict[str, Any]:
    found: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def test_every_v1_endpoint_is_documented(spec_app: FastAPI, spec: dict[str, Any]) -> None:
    served = {
        (method.lower(), context.path)
        for context in iter_route_contexts(spec_app.routes)
        if isinstance(context.original_route, APIRoute)
        and context.path is not None
        and context.path.startswith("/v1")
        for method in context.methods or ()
    }
    assert len(served) > 20
    assert set(_operations(spec)) == served


def test_every_operation_documents_its_errors_with_the_envelope(spec: dict[str, Any]) -> None:
    operations = _operations(spec)
    for (method, path), operation in operations.items():
        responses = operation["responses"]
        required = {"401", "422"} | REQUIRED_ERRORS.get((method, path), set())
        if "{" in path:
            required.add("404")
        missing = required - set(responses)
        assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
                assert response["description"], (method, path, status)
    for route in REQUIRED_ERRORS:
        assert route in operations, f"{route} is not served any more"


def test_no_default_validation_error_schema_is_left(spec: dict[str, Any]) -> None:
    # FastAPI adds HTTPValidationError wherever a route's 422 is not documented as ours.
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]


def test_the_error_schema_is_the_openai_envelope(spec: dict[str, Any]) -> None:
    envelope = spec["components"]["schemas"]["ErrorResponse"]
    assert envelope["required"] == ["error"]
    body = _schema(spec, envelope["properties"]["error"]["$ref"])
    assert set(body["properties"]) == {"message", "type", "param", "code"}
    assert set(body["required"]) == {"message", "type"}
    for example in envelope["examples"]:
        ErrorResponse.model_validate(example)


def test_real_errors_match_the_documented_schema(client: TestClient, team_key: str) -> None:
    for response in (
        client.get("/v1/files"),
        client.get("/v1/files/file-missing", headers=auth(team_key)),
        client.get("/v1/files?limit=0", headers=auth(team_key)),
        client.post("/v1/admin/teams", json={"name": "x"}, headers=auth(team_key)),
        client.post("/v1/fine_tuning/jobs", json={"model": 1}, headers=auth(team_key)),
        client.get("/v1/nowhere", headers=auth(team_key)),
    ):
        assert response.status_code >= 400
        ErrorResponse.model_validate(response.json())
        assert set(response.json()) == {"error"}


def test_operations_are_described_and_uniquely_named(spec: dict[str, Any]) -> None:
    operations = _operations(spec)
    ids = [operation["operationId"] for operation in operations.values()]
    assert len(ids) == len(set(ids))
    for (method, path), operation in operations.items():
        assert operation.get("summary"), (method, path)
        assert operation.get("description"), (method, path)
        assert operation.get("tags"), (method, path)


def test_readyz_documents_its_503(spec: dict[str, Any]) -> None:
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


@pytest.mark.parametrize(("route", "model"), list(BODIES_WITH_EXAMPLES.items()))
def test_request_bodies_carry_valid_examples(
    spec: dict[str, Any], route: tuple[str, str], model: type[BaseModel]
) -> None:
    method, path = route
    body = spec["paths"][path][method]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    examples = _schema(spec, schema["$ref"])["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)


def test_the_examples_are_accepted_by_the_service(
    client: TestClient, team_key: str, training_file: str
) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    (team,) = schemas["TeamCreate"]["examples"]
    created = client.post("/v1/admin/teams", json=team, headers=ADMIN)
    assert created.status_code == 200, created.text

    (pair,) = schemas["ModelPairCreate"]["examples"]
    registered = client.post("/v1/models", json=pair, headers=ADMIN)
    assert registered.status_code == 200, registered.text

    (job,) = schemas["JobCreate"]["examples"]
    # The example's ids are placeholders: the team's real file, the model just registered.
    job = {**job, "model": pair["id"], "training_file": training_file}
    submitted = client.post("/v1/fine_tuning/jobs", json=job, headers=auth(team_key))
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["method"]["type"] == job["method"]["type"]
