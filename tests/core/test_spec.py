"""The typed job spec: defaults per method, the rules, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from asft_core.spec import (
    BASE_LEARNING_RATE,
    BOUNDS,
    DEFAULT_LAMBDA,
    DEFAULT_SAFELORA_THRESHOLD,
    DEFAULT_SUBSPACE_ENERGY,
    METHODS,
    Gate,
    GateVerdict,
    Hyperparameters,
    JobSpec,
    Report,
    SpecError,
)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_through_json(method: str) -> None:
    spec = JobSpec.resolve(method, {"n_epochs": 2, "rank": 4, "target_modules": ["q_proj"]})
    stored = json.loads(json.dumps(spec.to_json()))
    assert JobSpec.from_json(stored) == spec
    assert stored["type"] == method
    assert stored[method]["hyperparameters"]["target_modules"] == ["q_proj"]


def test_defaults_are_filled_per_method() -> None:
    l2 = JobSpec.resolve("l2", {}).hyperparameters
    assert l2.lambda_ == DEFAULT_LAMBDA["l2"] and l2.subspace_energy is None
    projector = JobSpec.resolve("asft_projector", {}).hyperparameters
    assert projector.subspace_energy == DEFAULT_SUBSPACE_ENERGY
    assert JobSpec.resolve("safelora", {}).hyperparameters.safelora_threshold == (
        DEFAULT_SAFELORA_THRESHOLD
    )
    counted = JobSpec.resolve("safelora", {"safelora_num_modules": 3}).hyperparameters
    assert counted.safelora_threshold is None
    assert JobSpec.resolve("supervised", {}).hyperparameters.lambda_ is None
    # The JSON holds only what the method reads, so a job shows what it trains with.
    shown = JobSpec.resolve("supervised", {}).to_json()["supervised"]["hyperparameters"]
    assert "lambda" not in shown and "safelora_threshold" not in shown


def test_auto_and_the_multiplier_resolve_to_numbers() -> None:
    spec = JobSpec.resolve("asft", {"n_epochs": "auto", "learning_rate_multiplier": 2.0})
    assert spec.hyperparameters.n_epochs == Hyperparameters().n_epochs
    assert spec.hyperparameters.learning_rate == pytest.approx(2 * BASE_LEARNING_RATE)
    assert JobSpec.resolve("asft", {"lambda": 0.25}).hyperparameters.lambda_ == 0.25


@pytest.mark.parametrize(
    ("method", "given", "code", "message"),
    [
        ("dpo", {}, "invalid_method", "method must be one of"),
        ("supervised", {"lambda": 1.0}, "invalid_hyperparameter", "lambda not used by method"),
        ("l2", {"n_epochs": 51}, "invalid_hyperparameter", "n_epochs must be between 1 and 50"),
        ("l2", {"dropout": 1.0}, "invalid_hyperparameter", "dropout must be in [0, 1)"),
        ("l2", {"target_modules": ["q proj"]}, "invalid_hyperparameter", "not a module name"),
        ("l2", {"bogus": 1}, "invalid_hyperparameter", "unknown hyperparameter bogus"),
        (
            "safelora",
            {"safelora_threshold": 0.5, "safelora_num_modules": 1},
            "invalid_safelora",
            "not both",
        ),
    ],
)
def test_bad_specs_are_refused_with_a_code(
    method: str, given: dict[str, object], code: str, message: str
) -> None:
    with pytest.raises(SpecError) as caught:
        JobSpec.resolve(method, given)
    assert caught.value.code == code
    assert message in str(caught.value)


def test_bounds_describe_themselves_as_the_api_says_them() -> None:
    assert BOUNDS["learning_rate_multiplier"].describe() == "in (0, 100]"
    assert BOUNDS["warmup_steps"].field_kwargs() == {"ge": 0, "le": 1_000_000}


def test_the_report_and_verdict_round_trip() -> None:
    cell = {"value": 0.1, "low": 0.0, "high": 0.2}
    report = Report(
        evaluation={"reference": {"safety": {"overall": cell}}, "fine_tuned": {"safety": None}},
        gate=GateVerdict(False, ("overall: too high",), *vars(Gate()).values()),
        validation_loss=1.5,
    )
    assert Report.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert report.harmful_score("reference") == 0.1
    assert report.harmful_score("fine_tuned") is None
