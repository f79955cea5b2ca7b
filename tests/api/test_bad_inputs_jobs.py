"""A corpus of bad ``POST /v1/fine_tuning/jobs`` requests: each gets its exact status and
``error.code`` (and ``param`` where it names something) in the envelope, never a 5xx, and no
job is created.

FastAPI's validation errors render as 422 ``invalid_request`` whose ``param`` is the field's
dotted path; our own checks (files, model, dataset size, evaluation file) have their own codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import auth, jsonl, sentiment_rows

JOBS = "/v1/fine_tuning/jobs"
# Marks where a case's param is not asserted exactly (see ``Case.param``).
ANY = object()


@dataclass(frozen=True)
class Files:
    """The file ids a case can refer to."""

    training: str
    tiny: str
    broken: str
    chat: str
    foreign: str


@dataclass(frozen=True)
class Case:
    """One bad request: its body (from the files), and the answer it must get."""

    name: str
    body: Callable[[Files], Any]
    status: int
    code: str
    # The exact param; ANY when only ``param_prefix`` is checked.
    param: Any = None
    param_prefix: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    message_has: str | None = None


def valid(files: Files, **fields: Any) -> dict[str, Any]:
    """A valid body with ``fields`` added or replaced."""
    return {"model": "tiny-chat", "training_file": files.training, **fields}


def asft(files: Files, **hyperparameters: Any) -> dict[str, Any]:
    """A body whose AsFT block holds ``hyperparameters``."""
    return valid(files, method={"type": "asft", "asft": {"hyperparameters": hyperparameters}})


def raw(text: str) -> Callable[[Files], bytes]:
    """A body sent as these bytes, not as JSON built from a dict."""
    return lambda files: text.replace("TRAINING", files.training).encode()


INVALID = "invalid_request"
ASFT = "method.asft.hyperparameters"
CASES = [
    # -- the body itself --
    Case("broken_json", raw('{"model": "tiny-chat", '), 422, INVALID, ANY),
    Case("body_is_a_list", raw('["tiny-chat"]'), 422, INVALID),
    Case("body_is_a_string", raw('"tiny-chat"'), 422, INVALID),
    Case("body_is_null", raw("null"), 422, INVALID),
    Case("empty_body", raw(""), 422, INVALID),
    Case(
        "nan_lambda",
        raw(
            '{"model": "tiny-chat", "training_file": "TRAINING", '
            '"method": {"type": "asft", "asft": {"hyperparameters": {"lambda": NaN}}}}'
        ),
        422,
        INVALID,
        f"{ASFT}.lambda",
    ),
    Case(
        "infinite_alpha",
        raw(
            '{"model": "tiny-chat", "training_file": "TRAINING", '
            '"method": {"type": "asft", "asft": {"hyperparameters": {"alpha": Infinity}}}}'
        ),
        422,
        INVALID,
        f"{ASFT}.alpha",
    ),
    Case("unknown_top_level_field", lambda f: valid(f, n_epochs=3), 422, INVALID, "n_epochs"),
    # -- model and files --
    Case("missing_model", lambda f: {"training_file": f.training}, 422, INVALID, "model"),
    Case("missing_training_file", lambda f: {"model": "tiny-chat"}, 422, INVALID, "training_file"),
    Case("model_is_a_number", lambda f: valid(f, model=5), 422, INVALID, "model"),
    Case("model_is_empty", lambda f: valid(f, model=""), 422, INVALID, "model"),
    Case(
        "training_file_is_a_list",
        lambda f: valid(f, training_file=[f.training]),
        422,
        INVALID,
        "training_file",
    ),
    Case("unknown_model", lambda f: valid(f, model="gpt-17"), 404, "model_not_found", "model"),
    Case(
        "unknown_training_file",
        lambda f: valid(f, training_file="file-nothere"),
        404,
        "file_not_found",
        "training_file",
    ),
    Case(
        "another_teams_file",
        lambda f: valid(f, training_file=f.foreign),
        404,
        "file_not_found",
        "training_file",
    ),
    Case(
        "unknown_validation_file",
        lambda f: valid(f, validation_file="file-nothere"),
        404,
        "file_not_found",
        "validation_file",
    ),
    Case(
        "another_teams_validation_file",
        lambda f: valid(f, validation_file=f.foreign),
        404,
        "file_not_found",
        "validation_file",
    ),
    Case(
        "too_few_examples",
        lambda f: valid(f, training_file=f.tiny),
        422,
        "invalid_n_examples",
        "training_file",
        message_has="3 examples",
    ),
    Case(
        "training_file_with_errors",
        lambda f: valid(f, training_file=f.broken),
        422,
        "invalid_json",
        "training_file",
        message_has="line 2",
    ),
    Case(
        "validation_file_with_errors",
        lambda f: valid(f, validation_file=f.broken),
        422,
        "invalid_json",
        "validation_file",
    ),
    # -- hyperparameters --
    Case(
        "negative_n_epochs",
        lambda f: valid(f, hyperparameters={"n_epochs": -1}),
        422,
        INVALID,
        "hyperparameters.n_epochs",
        message_has="between 1 and 50",
    ),
    Case(
        "zero_n_epochs",
        lambda f: valid(f, hyperparameters={"n_epochs": 0}),
        422,
        INVALID,
        "hyperparameters.n_epochs",
    ),
    Case(
        "huge_n_epochs",
        lambda f: valid(f, hyperparameters={"n_epochs": 10**9}),
        422,
        INVALID,
        "hyperparameters.n_epochs",
    ),
    Case(
        "fractional_n_epochs",
        lambda f: valid(f, hyperparameters={"n_epochs": 1.5}),
        422,
        INVALID,
        ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "batch_size_big",
        lambda f: valid(f, hyperparameters={"batch_size": "big"}),
        422,
        INVALID,
        ANY,
        "hyperparameters.batch_size",
    ),
    Case("batch_size_zero", lambda f: asft(f, batch_size=0), 422, INVALID, f"{ASFT}.batch_size"),
    Case(
        "negative_multiplier",
        lambda f: valid(f, hyperparameters={"learning_rate_multiplier": -1}),
        422,
        INVALID,
        "hyperparameters.learning_rate_multiplier",
    ),
    Case(
        "rate_and_multiplier",
        lambda f: asft(f, learning_rate=1e-4, learning_rate_multiplier=2),
        422,
        INVALID,
        "method.asft.hyperparameters",
        message_has="not both",
    ),
    Case(
        "unknown_legacy_hyperparameter",
        lambda f: valid(f, hyperparameters={"epochs": 3}),
        422,
        INVALID,
        "hyperparameters.epochs",
    ),
    Case("negative_lambda", lambda f: asft(f, **{"lambda": -1}), 422, INVALID, f"{ASFT}.lambda"),
    Case(
        "lambda_is_text", lambda f: asft(f, **{"lambda": "strong"}), 422, INVALID, f"{ASFT}.lambda"
    ),
    Case("rank_zero", lambda f: asft(f, rank=0), 422, INVALID, f"{ASFT}.rank"),
    Case("rank_huge", lambda f: asft(f, rank=100_000), 422, INVALID, f"{ASFT}.rank"),
    Case("dropout_above_one", lambda f: asft(f, dropout=1.5), 422, INVALID, f"{ASFT}.dropout"),
    Case("alpha_zero", lambda f: asft(f, alpha=0), 422, INVALID, f"{ASFT}.alpha"),
    Case(
        "penalty_rank_zero", lambda f: asft(f, penalty_rank=0), 422, INVALID, f"{ASFT}.penalty_rank"
    ),
    Case(
        "empty_target_modules",
        lambda f: asft(f, target_modules=[]),
        422,
        INVALID,
        f"{ASFT}.target_modules",
    ),
    Case(
        "target_module_with_a_space",
        lambda f: asft(f, target_modules=["q proj"]),
        422,
        INVALID,
        f"{ASFT}.target_modules",
        message_has="not a module name",
    ),
    Case("unknown_hyperparameter", lambda f: asft(f, lr=0.1), 422, INVALID, f"{ASFT}.lr"),
    # -- methods --
    Case(
        "unknown_method_type",
        lambda f: valid(f, method={"type": "dpo"}),
        422,
        INVALID,
        "method.type",
    ),
    Case(
        "method_without_type", lambda f: valid(f, method={"asft": {}}), 422, INVALID, "method.type"
    ),
    Case(
        "block_not_matching_type",
        lambda f: valid(f, method={"type": "asft", "safelora": {"hyperparameters": {}}}),
        422,
        INVALID,
        "method",
        message_has="method.safelora given",
    ),
    Case(
        "unknown_method_block",
        lambda f: valid(f, method={"type": "asft", "lora": {}}),
        422,
        INVALID,
        "method.lora",
    ),
    Case(
        "threshold_and_num_modules",
        lambda f: valid(
            f,
            method={
                "type": "safelora",
                "safelora": {
                    "hyperparameters": {"safelora_threshold": 0.5, "safelora_num_modules": 2}
                },
            },
        ),
        422,
        INVALID,
        "method.safelora.hyperparameters",
        message_has="not both",
    ),
    Case(
        "threshold_out_of_range",
        lambda f: valid(
            f,
            method={"type": "safelora", "safelora": {"hyperparameters": {"safelora_threshold": 2}}},
        ),
        422,
        INVALID,
        "method.safelora.hyperparameters.safelora_threshold",
    ),
    Case(
        "threshold_and_num_modules_across_blocks",
        lambda f: valid(
            f,
            hyperparameters={"safelora_threshold": 0.5},
            method={
                "type": "safelora",
                "safelora": {"hyperparameters": {"safelora_num_modules": 2}},
            },
        ),
        422,
        INVALID,
        None,
        message_has="not both",
    ),
    Case(
        "lambda_for_supervised",
        lambda f: valid(
            f, method={"type": "supervised", "supervised": {"hyperparameters": {"lambda": 0.5}}}
        ),
        422,
        INVALID,
        "method",
        message_has="lambda not used by method supervised",
    ),
    Case(
        "threshold_for_asft",
        lambda f: asft(f, safelora_threshold=0.4),
        422,
        INVALID,
        "method",
        message_has="safelora_threshold not used by method asft",
    ),
    Case(
        "legacy_lambda_for_safelora",
        lambda f: valid(f, hyperparameters={"lambda": 0.5}, method={"type": "safelora"}),
        422,
        INVALID,
        None,
        message_has="lambda not used by method safelora",
    ),
    # -- suffix, seed, metadata, integrations --
    Case("suffix_with_slash", lambda f: valid(f, suffix="team/bot"), 422, INVALID, "suffix"),
    Case("suffix_too_long", lambda f: valid(f, suffix="x" * 41), 422, INVALID, "suffix"),
    Case("suffix_empty", lambda f: valid(f, suffix=""), 422, INVALID, "suffix"),
    Case("seed_negative", lambda f: valid(f, seed=-1), 422, INVALID, "seed"),
    Case("seed_too_large", lambda f: valid(f, seed=2**31), 422, INVALID, "seed"),
    Case(
        "metadata_17_keys",
        lambda f: valid(f, metadata={f"k{i}": "v" for i in range(17)}),
        422,
        INVALID,
        "metadata",
        message_has="at most 16 keys",
    ),
    Case(
        "metadata_value_not_text",
        lambda f: valid(f, metadata={"env": 1}),
        422,
        INVALID,
        "metadata.env",
    ),
    Case(
        "metadata_key_too_long",
        lambda f: valid(f, metadata={"k" * 65: "v"}),
        422,
        INVALID,
        "metadata",
    ),
    Case("metadata_is_a_list", lambda f: valid(f, metadata=["env"]), 422, INVALID, "metadata"),
    Case(
        "integrations_not_empty",
        lambda f: valid(f, integrations=[{"type": "wandb", "wandb": {"project": "x"}}]),
        422,
        INVALID,
        "integrations",
    ),
    Case(
        "auto_start_not_bool",
        lambda f: valid(f, auto_start="sometimes"),
        422,
        INVALID,
        "auto_start",
    ),
    # -- evaluation --
    Case(
        "invalid_regex",
        lambda f: valid(
            f, validation_file=f.training, evaluation={"matcher": "regex", "pattern": "([a-z"}
        ),
        422,
        INVALID,
        "evaluation",
        message_has="invalid regex",
    ),
    Case(
        "regex_without_pattern",
        lambda f: valid(f, validation_file=f.training, evaluation={"matcher": "regex"}),
        422,
        INVALID,
        "evaluation",
        message_has="needs a pattern",
    ),
    Case(
        "unknown_matcher",
        lambda f: valid(f, validation_file=f.training, evaluation={"matcher": "bleu"}),
        422,
        INVALID,
        "evaluation.matcher",
    ),
    Case(
        "evaluation_max_examples_zero",
        lambda f: valid(f, validation_file=f.training, evaluation={"max_examples": 0}),
        422,
        INVALID,
        "evaluation.max_examples",
    ),
    Case(
        "evaluation_without_file",
        lambda f: valid(f, evaluation={}),
        422,
        "missing_evaluation_file",
        "evaluation.file",
    ),
    Case(
        "evaluation_on_chat_file",
        lambda f: valid(f, evaluation={"file": f.chat}),
        422,
        "invalid_evaluation_file",
        "evaluation.file",
    ),
    Case(
        "evaluation_on_foreign_file",
        lambda f: valid(f, evaluation={"file": f.foreign}),
        404,
        "file_not_found",
        "evaluation.file",
    ),
    # -- headers --
    Case(
        "idempotency_key_too_long",
        lambda f: valid(f),
        422,
        INVALID,
        ANY,
        headers={"Idempotency-Key": "k" * 256},
        message_has="at most 255 characters",
    ),
]


@pytest.fixture
def files(
    client: TestClient,
    team_key: str,
    training_file: str,
    model_pair: str,
    make_team: Callable[[str], tuple[str, str]],
    upload: Callable[..., dict[str, Any]],
) -> Files:
    """Team alpha's files of every kind, and a file of team beta."""
    chat_rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(12)
    ]
    broken = jsonl(sentiment_rows(1)) + b"{not json\n" + jsonl(sentiment_rows(12, start=1))
    broken_file = upload(team_key, broken, "broken.jsonl")
    assert broken_file["status"] == "error"
    _, beta_key = make_team("beta")
    return Files(
        training=training_file,
        tiny=upload(team_key, jsonl(sentiment_rows(3)), "tiny.jsonl")["id"],
        broken=broken_file["id"],
        chat=upload(team_key, jsonl(chat_rows), "chat.jsonl")["id"],
        foreign=upload(beta_key, jsonl(sentiment_rows(20)), "beta.jsonl")["id"],
    )


def test_the_corpus_is_large_and_named_uniquely() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 20
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_job_request(client: TestClient, team_key: str, files: Files, case: Case) -> None:
    body = case.body(files)
    headers = {**auth(team_key), **case.headers}
    if isinstance(body, bytes):
        response = client.post(
            JOBS, content=body, headers={**headers, "Content-Type": "application/json"}
        )
    else:
        response = client.post(JOBS, json=body, headers=headers)
    assert response.status_code < 500, response.text
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == case.code, error
    assert error["type"] == {404: "not_found_error", 422: "invalid_request_error"}[case.status]
    assert error["message"]
    if case.param is not ANY:
        assert error["param"] == case.param, error
    if case.param_prefix is not None:
        assert str(error["param"]).startswith(case.param_prefix), error
    if case.message_has is not None:
        assert case.message_has in error["message"], error
    # Nothing was created, and the failure left the team able to create a job.
    assert client.get(JOBS, headers=auth(team_key)).json()["data"] == []
    good = client.post(JOBS, json=valid(files), headers=auth(team_key))
    assert good.status_code == 200, good.text


def test_a_body_over_the_json_limit_is_413(client: TestClient, team_key: str) -> None:
    body = json.dumps({"model": "tiny-chat", "training_file": "f", "suffix": "x" * (1 << 20)})
    response = client.post(
        JOBS, content=body, headers={**auth(team_key), "Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_no_key_is_401_before_any_validation(client: TestClient) -> None:
    response = client.post(JOBS, json={"model": 5})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
