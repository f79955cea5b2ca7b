"""A corpus of bad ``POST /v1/fine_tuning/jobs`` requests: each gets its exact status and
``error.code`` (and ``param`` where it names something) in the envelope, never a 5xx, and no
job is created.

Every field of the body and every hyperparameter is walked: wrong type, out of range, too long,
empty, null, unknown, text that no database can hold. FastAPI's validation errors render as
422 ``invalid_request`` whose ``param`` is the field's dotted path (types are strict: ``"3"``
is not a number, ``1`` not a boolean); a body that is not JSON is 422 ``invalid_json``, one
that cannot even be decoded 400 ``invalid_body``; our own checks (files, model, dataset size,
evaluation file) have their own codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.db.models import Job
from tests.api import corpus
from tests.api.conftest import auth, jsonl, sentiment_rows

JOBS = "/v1/fine_tuning/jobs"


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
    # The exact param; corpus.ANY when only ``param_prefix`` is checked.
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


def safelora(files: Files, **hyperparameters: Any) -> dict[str, Any]:
    """A body whose Safe LoRA block holds ``hyperparameters``."""
    block = {"hyperparameters": hyperparameters}
    return valid(files, method={"type": "safelora", "safelora": block})


def raw(text: str) -> Callable[[Files], bytes]:
    """A body sent as these bytes, not as JSON built from a dict."""
    return lambda files: text.replace("TRAINING", files.training).encode()


INVALID = "invalid_request"
ASFT = "method.asft.hyperparameters"
SAFELORA = "method.safelora.hyperparameters"
CASES = [
    # -- the body itself --
    Case("broken_json", raw('{"model": "tiny-chat", '), 422, "invalid_json"),
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
        corpus.ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "batch_size_big",
        lambda f: valid(f, hyperparameters={"batch_size": "big"}),
        422,
        INVALID,
        corpus.ANY,
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
    Case(
        "python_spelling_of_lambda",
        lambda f: asft(f, lambda_=10.0),
        422,
        INVALID,
        f"{ASFT}.lambda_",
    ),
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
        "python_spelling_of_asft_safelora",
        lambda f: valid(f, method={"type": "asft+safelora", "asft_safelora": {}}),
        422,
        INVALID,
        "method.asft_safelora",
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
        "idempotency-key",
        headers={"Idempotency-Key": "k" * 256},
        message_has="at most 255 characters",
    ),
    # -- every field of the body: wrong type, out of range, too long, empty, null --
    Case("model_is_null", lambda f: valid(f, model=None), 422, INVALID, "model"),
    Case("model_too_long", lambda f: valid(f, model="m" * 129), 422, INVALID, "model"),
    Case("model_with_a_nul", lambda f: valid(f, model="tiny-chat\x00"), 422, INVALID, "model"),
    Case("model_with_a_newline", lambda f: valid(f, model="tiny-chat\n"), 422, INVALID, "model"),
    Case("model_is_a_list", lambda f: valid(f, model=["tiny-chat"]), 422, INVALID, "model"),
    Case(
        "training_file_is_null",
        lambda f: valid(f, training_file=None),
        422,
        INVALID,
        "training_file",
    ),
    Case(
        "training_file_is_empty",
        lambda f: valid(f, training_file=""),
        422,
        INVALID,
        "training_file",
    ),
    Case(
        "training_file_too_long",
        lambda f: valid(f, training_file="f" * 65),
        422,
        INVALID,
        "training_file",
    ),
    Case(
        "training_file_is_a_number",
        lambda f: valid(f, training_file=7),
        422,
        INVALID,
        "training_file",
    ),
    Case(
        "training_file_is_a_path",
        lambda f: valid(f, training_file="../../etc/passwd"),
        404,
        "file_not_found",
        "training_file",
    ),
    Case(
        "training_file_with_a_nul",
        lambda f: valid(f, training_file="file-\x00"),
        404,
        "file_not_found",
        "training_file",
    ),
    Case(
        "validation_file_is_a_number",
        lambda f: valid(f, validation_file=7),
        422,
        INVALID,
        "validation_file",
    ),
    Case(
        "validation_file_is_empty",
        lambda f: valid(f, validation_file=""),
        422,
        INVALID,
        "validation_file",
    ),
    Case(
        "validation_file_too_long",
        lambda f: valid(f, validation_file="f" * 65),
        422,
        INVALID,
        "validation_file",
    ),
    Case(
        "hyperparameters_is_a_list",
        lambda f: valid(f, hyperparameters=[]),
        422,
        INVALID,
        "hyperparameters",
    ),
    Case(
        "hyperparameters_is_a_string",
        lambda f: valid(f, hyperparameters="auto"),
        422,
        INVALID,
        "hyperparameters",
    ),
    Case("method_is_a_string", lambda f: valid(f, method="asft"), 422, INVALID, "method"),
    Case("suffix_is_a_number", lambda f: valid(f, suffix=7), 422, INVALID, "suffix"),
    Case("suffix_not_ascii", lambda f: valid(f, suffix="caf\u00e9"), 422, INVALID, "suffix"),
    Case("suffix_with_a_space", lambda f: valid(f, suffix="my bot"), 422, INVALID, "suffix"),
    Case("seed_is_text", lambda f: valid(f, seed="5"), 422, INVALID, "seed"),
    Case("seed_is_fractional", lambda f: valid(f, seed=1.5), 422, INVALID, "seed"),
    Case("seed_is_a_boolean", lambda f: valid(f, seed=True), 422, INVALID, "seed"),
    Case(
        "seed_is_infinite",
        raw('{"model": "tiny-chat", "training_file": "TRAINING", "seed": 1e999}'),
        422,
        INVALID,
        "seed",
    ),
    Case(
        "seed_with_5000_digits",
        raw('{"model": "tiny-chat", "training_file": "TRAINING", "seed": ' + "9" * 5000 + "}"),
        400,
        "invalid_body",
    ),
    Case("metadata_is_a_string", lambda f: valid(f, metadata="env=prod"), 422, INVALID, "metadata"),
    Case(
        "metadata_value_too_long",
        lambda f: valid(f, metadata={"k": "v" * 513}),
        422,
        INVALID,
        "metadata",
        message_has="values at most 512",
    ),
    Case("metadata_empty_key", lambda f: valid(f, metadata={"": "v"}), 422, INVALID, "metadata"),
    Case(
        "metadata_value_with_a_nul",
        lambda f: valid(f, metadata={"k": "a\x00b"}),
        422,
        INVALID,
        "metadata",
        message_has="NUL",
    ),
    Case(
        "metadata_key_with_a_nul",
        lambda f: valid(f, metadata={"a\x00b": "v"}),
        422,
        INVALID,
        "metadata",
        message_has="NUL",
    ),
    Case(
        "metadata_value_a_lone_surrogate",
        raw('{"model": "tiny-chat", "training_file": "TRAINING", "metadata": {"k": "\\ud800"}}'),
        422,
        INVALID,
        "metadata",
        message_has="lone surrogates",
    ),
    Case(
        "metadata_value_null", lambda f: valid(f, metadata={"k": None}), 422, INVALID, "metadata.k"
    ),
    Case(
        "metadata_value_nested",
        lambda f: valid(f, metadata={"k": {"a": "b"}}),
        422,
        INVALID,
        "metadata.k",
    ),
    Case(
        "integrations_is_a_string",
        lambda f: valid(f, integrations="wandb"),
        422,
        INVALID,
        "integrations",
    ),
    Case(
        "integrations_holds_null",
        lambda f: valid(f, integrations=[None]),
        422,
        INVALID,
        "integrations",
    ),
    Case("auto_start_is_text", lambda f: valid(f, auto_start="true"), 422, INVALID, "auto_start"),
    Case("auto_start_is_a_number", lambda f: valid(f, auto_start=1), 422, INVALID, "auto_start"),
    Case("auto_start_is_null", lambda f: valid(f, auto_start=None), 422, INVALID, "auto_start"),
    # -- every hyperparameter (legacy block: param starts with the field; unions add a branch) --
    Case(
        "n_epochs_is_text",
        lambda f: valid(f, hyperparameters={"n_epochs": "3"}),
        422,
        INVALID,
        corpus.ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "n_epochs_is_a_boolean",
        lambda f: valid(f, hyperparameters={"n_epochs": True}),
        422,
        INVALID,
        corpus.ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "n_epochs_whole_float",
        lambda f: valid(f, hyperparameters={"n_epochs": 3.0}),
        422,
        INVALID,
        corpus.ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "n_epochs_auto_in_capitals",
        lambda f: valid(f, hyperparameters={"n_epochs": "AUTO"}),
        422,
        INVALID,
        corpus.ANY,
        "hyperparameters.n_epochs",
    ),
    Case(
        "n_epochs_51",
        lambda f: asft(f, n_epochs=51),
        422,
        INVALID,
        f"{ASFT}.n_epochs",
        message_has="between 1 and 50",
    ),
    Case(
        "batch_size_257",
        lambda f: valid(f, hyperparameters={"batch_size": 257}),
        422,
        INVALID,
        "hyperparameters.batch_size",
    ),
    Case(
        "batch_size_is_a_boolean",
        lambda f: asft(f, batch_size=True),
        422,
        INVALID,
        corpus.ANY,
        f"{ASFT}.batch_size",
    ),
    Case(
        "multiplier_zero",
        lambda f: valid(f, hyperparameters={"learning_rate_multiplier": 0}),
        422,
        INVALID,
        "hyperparameters.learning_rate_multiplier",
        message_has="(0, 100]",
    ),
    Case(
        "multiplier_101",
        lambda f: asft(f, learning_rate_multiplier=101),
        422,
        INVALID,
        f"{ASFT}.learning_rate_multiplier",
    ),
    Case(
        "multiplier_is_text",
        lambda f: asft(f, learning_rate_multiplier="1.5"),
        422,
        INVALID,
        corpus.ANY,
        f"{ASFT}.learning_rate_multiplier",
    ),
    Case(
        "learning_rate_zero",
        lambda f: asft(f, learning_rate=0),
        422,
        INVALID,
        f"{ASFT}.learning_rate",
    ),
    Case(
        "learning_rate_two",
        lambda f: asft(f, learning_rate=2),
        422,
        INVALID,
        f"{ASFT}.learning_rate",
    ),
    Case(
        "learning_rate_is_text",
        lambda f: asft(f, learning_rate="1e-4"),
        422,
        INVALID,
        f"{ASFT}.learning_rate",
    ),
    Case(
        "learning_rate_is_nan",
        raw(
            '{"model": "tiny-chat", "training_file": "TRAINING", '
            '"hyperparameters": {"learning_rate": NaN}}'
        ),
        422,
        INVALID,
        "hyperparameters.learning_rate",
    ),
    Case("lambda_too_large", lambda f: asft(f, **{"lambda": 1e7}), 422, INVALID, f"{ASFT}.lambda"),
    Case("rank_fractional", lambda f: asft(f, rank=1.5), 422, INVALID, f"{ASFT}.rank"),
    Case("rank_is_text", lambda f: asft(f, rank="8"), 422, INVALID, f"{ASFT}.rank"),
    Case("alpha_negative", lambda f: asft(f, alpha=-1), 422, INVALID, f"{ASFT}.alpha"),
    Case("alpha_4097", lambda f: asft(f, alpha=4097), 422, INVALID, f"{ASFT}.alpha"),
    Case("dropout_one", lambda f: asft(f, dropout=1), 422, INVALID, f"{ASFT}.dropout"),
    Case("dropout_negative", lambda f: asft(f, dropout=-0.1), 422, INVALID, f"{ASFT}.dropout"),
    Case(
        "target_modules_is_a_string",
        lambda f: asft(f, target_modules="q_proj"),
        422,
        INVALID,
        f"{ASFT}.target_modules",
    ),
    Case(
        "target_module_is_a_number",
        lambda f: asft(f, target_modules=[1]),
        422,
        INVALID,
        f"{ASFT}.target_modules.0",
    ),
    Case(
        "target_modules_33",
        lambda f: asft(f, target_modules=[f"m{i}" for i in range(33)]),
        422,
        INVALID,
        f"{ASFT}.target_modules",
    ),
    Case(
        "target_module_name_too_long",
        lambda f: asft(f, target_modules=["m" * 65]),
        422,
        INVALID,
        f"{ASFT}.target_modules",
        message_has="not a module name",
    ),
    Case(
        "target_module_name_empty",
        lambda f: asft(f, target_modules=[""]),
        422,
        INVALID,
        f"{ASFT}.target_modules",
        message_has="not a module name",
    ),
    Case(
        "threshold_below_minus_one",
        lambda f: safelora(f, safelora_threshold=-1.5),
        422,
        INVALID,
        f"{SAFELORA}.safelora_threshold",
    ),
    Case(
        "num_modules_zero",
        lambda f: safelora(f, safelora_num_modules=0),
        422,
        INVALID,
        f"{SAFELORA}.safelora_num_modules",
    ),
    Case(
        "num_modules_10001",
        lambda f: safelora(f, safelora_num_modules=10_001),
        422,
        INVALID,
        f"{SAFELORA}.safelora_num_modules",
    ),
    Case("max_seq_len_15", lambda f: asft(f, max_seq_len=15), 422, INVALID, f"{ASFT}.max_seq_len"),
    Case(
        "max_seq_len_32769",
        lambda f: asft(f, max_seq_len=32_769),
        422,
        INVALID,
        f"{ASFT}.max_seq_len",
    ),
    Case(
        "max_seq_len_is_text",
        lambda f: asft(f, max_seq_len="512"),
        422,
        INVALID,
        f"{ASFT}.max_seq_len",
    ),
    Case(
        "accumulation_zero",
        lambda f: asft(f, gradient_accumulation_steps=0),
        422,
        INVALID,
        f"{ASFT}.gradient_accumulation_steps",
    ),
    Case(
        "accumulation_1025",
        lambda f: asft(f, gradient_accumulation_steps=1025),
        422,
        INVALID,
        f"{ASFT}.gradient_accumulation_steps",
    ),
    Case(
        "warmup_negative", lambda f: asft(f, warmup_steps=-1), 422, INVALID, f"{ASFT}.warmup_steps"
    ),
    Case(
        "warmup_too_many",
        lambda f: asft(f, warmup_steps=1_000_001),
        422,
        INVALID,
        f"{ASFT}.warmup_steps",
    ),
    Case(
        "penalty_rank_4097",
        lambda f: asft(f, penalty_rank=4097),
        422,
        INVALID,
        f"{ASFT}.penalty_rank",
    ),
    Case(
        "penalty_rank_for_supervised",
        lambda f: valid(
            f, method={"type": "supervised", "supervised": {"hyperparameters": {"penalty_rank": 4}}}
        ),
        422,
        INVALID,
        "method",
        message_has="penalty_rank not used by method supervised",
    ),
    Case(
        "legacy_penalty_rank_for_safelora",
        lambda f: valid(f, hyperparameters={"penalty_rank": 4}, method={"type": "safelora"}),
        422,
        INVALID,
        None,
        message_has="penalty_rank not used by method safelora",
    ),
    Case(
        "num_modules_for_supervised",
        lambda f: valid(
            f,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"safelora_num_modules": 2}},
            },
        ),
        422,
        INVALID,
        "method",
        message_has="safelora_num_modules not used by method supervised",
    ),
    # -- method blocks --
    Case(
        "method_type_is_null",
        lambda f: valid(f, method={"type": None}),
        422,
        INVALID,
        "method.type",
    ),
    Case(
        "method_type_in_capitals",
        lambda f: valid(f, method={"type": "ASFT"}),
        422,
        INVALID,
        "method.type",
    ),
    Case(
        "method_block_is_a_list",
        lambda f: valid(f, method={"type": "asft", "asft": []}),
        422,
        INVALID,
        "method.asft",
    ),
    Case(
        "method_hyperparameters_null",
        lambda f: valid(f, method={"type": "asft", "asft": {"hyperparameters": None}}),
        422,
        INVALID,
        f"{ASFT}",
    ),
    Case(
        "unknown_field_in_method_block",
        lambda f: valid(f, method={"type": "asft", "asft": {"hyperparameters": {}, "epochs": 3}}),
        422,
        INVALID,
        "method.asft.epochs",
    ),
    Case(
        "combined_block_for_another_type",
        lambda f: valid(f, method={"type": "safelora", "asft+safelora": {"hyperparameters": {}}}),
        422,
        INVALID,
        "method",
        message_has="method.asft+safelora given but method.type is safelora",
    ),
    # -- evaluation --
    Case(
        "evaluation_is_a_string", lambda f: valid(f, evaluation="regex"), 422, INVALID, "evaluation"
    ),
    Case(
        "evaluation_pattern_too_long",
        lambda f: valid(
            f, evaluation={"matcher": "regex", "pattern": "a" * 1001, "file": f.training}
        ),
        422,
        INVALID,
        "evaluation.pattern",
    ),
    Case(
        "evaluation_file_is_a_number",
        lambda f: valid(f, evaluation={"file": 7}),
        422,
        INVALID,
        "evaluation.file",
    ),
    Case(
        "evaluation_file_is_empty",
        lambda f: valid(f, evaluation={"file": ""}),
        422,
        INVALID,
        "evaluation.file",
    ),
    Case(
        "evaluation_max_examples_too_many",
        lambda f: valid(f, evaluation={"file": f.training, "max_examples": 100_001}),
        422,
        INVALID,
        "evaluation.max_examples",
    ),
    Case(
        "evaluation_max_examples_is_text",
        lambda f: valid(f, evaluation={"file": f.training, "max_examples": "5"}),
        422,
        INVALID,
        "evaluation.max_examples",
    ),
    Case(
        "evaluation_unknown_field",
        lambda f: valid(f, evaluation={"file": f.training, "metric": "f1"}),
        422,
        INVALID,
        "evaluation.metric",
    ),
    Case(
        "evaluation_matcher_null",
        lambda f: valid(f, evaluation={"file": f.training, "matcher": None}),
        422,
        INVALID,
        "evaluation.matcher",
    ),
    Case(
        "evaluation_on_a_file_with_errors",
        lambda f: valid(f, evaluation={"file": f.broken}),
        422,
        "invalid_json",
        "evaluation.file",
        message_has="line 2",
    ),
    Case(
        "evaluation_on_unknown_file",
        lambda f: valid(f, evaluation={"file": "file-nothere"}),
        404,
        "file_not_found",
        "evaluation.file",
    ),
    # -- the body as a whole --
    Case(
        "body_not_utf8",
        lambda f: b'{"model": "caf\xe9", "training_file": "x"}',
        400,
        "invalid_body",
    ),
    Case("body_nested_100000_deep", lambda f: b"[" * 100_000 + b"]" * 100_000, 400, "invalid_body"),
    Case(
        "trailing_garbage",
        raw('{"model": "tiny-chat", "training_file": "TRAINING"} x'),
        422,
        "invalid_json",
    ),
    Case(
        "json_sent_as_text_plain",
        lambda f: valid(f),
        422,
        INVALID,
        headers={"Content-Type": "text/plain"},
    ),
    Case(
        "idempotency_key_with_a_control_character",
        lambda f: valid(f),
        422,
        INVALID,
        "idempotency-key",
        headers={"Idempotency-Key": "retry\x7f1"},
    ),
]


@dataclass(frozen=True)
class World:
    """One app per database for the whole corpus: a refused request changes nothing (each case
    checks that), so the cases can share it, and the corpus runs in seconds."""

    app: FastAPI
    client: TestClient
    key: str
    files: Files


@pytest.fixture(scope="module", params=corpus.DATABASES)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Team alpha with files of every kind and a registered model; a file of team beta."""
    # Every case creates a good job afterwards: no limit may get in the way.
    apps = corpus.shared_app(
        request, tmp_path_factory, "jobs-corpus", max_active_jobs_per_team=100_000
    )
    for app, client, _, _ in apps:
        yield World(app, client, *_populate(client))


def _populate(client: TestClient) -> tuple[str, Files]:
    def team(name: str) -> str:
        return str(corpus.create_team(client, name)[1]["key"])

    corpus.register_pair(client)
    alpha, beta = team("alpha"), team("beta")
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
    return alpha, Files(
        training=corpus.upload_file(client, alpha, jsonl(sentiment_rows(20))),
        tiny=corpus.upload_file(client, alpha, jsonl(sentiment_rows(3))),
        broken=corpus.upload_file(client, alpha, broken),
        chat=corpus.upload_file(client, alpha, jsonl(chat_rows)),
        foreign=corpus.upload_file(client, beta, jsonl(sentiment_rows(20))),
    )


def test_the_corpus_is_large_and_named_uniquely() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 20
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_job_request(world: World, case: Case) -> None:
    client, files = world.client, world.files
    body = case.body(files)
    headers = {**auth(world.key), **case.headers}
    # Nothing was created, and the failure left the team able to create a job.
    with corpus.unchanged(lambda: corpus.row_counts(world.app, Job)):
        if isinstance(body, bytes):
            response = client.post(
                JOBS, content=body, headers={"Content-Type": "application/json", **headers}
            )
        else:
            response = client.post(JOBS, json=body, headers=headers)
        corpus.assert_envelope(
            response,
            case.status,
            case.code,
            param=case.param,
            param_prefix=case.param_prefix,
            message_has=case.message_has,
        )
    good = client.post(JOBS, json=valid(files), headers=auth(world.key))
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
