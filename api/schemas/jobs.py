"""The OpenAI ``fine_tuning.job`` shapes, with AsFT's methods and evaluation added.

Our parameters go under ``method.{type}.hyperparameters`` as OpenAI's do; ``"auto"`` is
accepted where OpenAI accepts it and resolved to the service's defaults (the AsFT paper's) at
creation, so a job always shows the values it trains with.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.schemas.common import PLAIN_TEXT
from asft_core.spec import (
    BASE_LEARNING_RATE,
    BOUNDS,
    DEFAULT_METHOD,
    DEFAULT_SUBSPACE_ENERGY,
    MATCHERS,
    MAX_TARGET_MODULES,
    METHODS,
    MODULE_NAME,
    DataPolicy,
    DataPolicyMode,
    JobSpec,
    Matcher,
    unused_parameters,
)
from asft_core.spec import Method as MethodType

Auto = Literal["auto"]
METADATA_MAX_KEYS = 16
# What no metadata key or value may hold: NUL (PostgreSQL cannot store it) and halves of
# surrogate pairs (no JSON answer could carry them back).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def check_metadata_pair(key: str, value: str) -> None:
    """Raise ``ValueError`` unless ``key: value`` can be a metadata pair: keys of 1-64
    characters, values of at most 512, neither holding NUL or a lone surrogate."""
    if not key or len(key) > 64 or len(value) > 512:
        raise ValueError("metadata keys are 1-64 characters, values at most 512")
    if _UNSTORABLE.search(key) or _UNSTORABLE.search(value):
        raise ValueError("metadata keys and values cannot hold NUL or lone surrogates")


class Strict(BaseModel):
    """Unknown fields are errors, so a typo never silently falls back to a default.

    Types are strict too: the schema says ``integer`` or ``boolean``, so ``"3"``, ``true`` as a
    number or ``1`` as a boolean are refused, not coerced (a JSON number 3.0 is not an integer
    here either; send 3).
    """

    model_config = ConfigDict(extra="forbid", strict=True)


def _bounded(name: str, description: str | None = None) -> Any:
    """An optional field with the spec's range for ``name`` (shown in the OpenAPI schema)."""
    return Field(None, description=description, **BOUNDS[name].field_kwargs())


def _check_auto_or_bounded(name: str, value: float | str | None) -> float | str | None:
    if isinstance(value, int | float) and not BOUNDS[name].holds(value):
        raise ValueError(f"{name} must be {BOUNDS[name].describe()}")
    return value


class Hyperparameters(Strict):
    """Training settings; every field is optional and ``auto`` means the default.

    The ranges and defaults are the job spec's (``asft_core.spec``).
    """

    n_epochs: int | Auto | None = Field(
        None, description=f"Passes over the data ({BOUNDS['n_epochs'].describe()})."
    )
    batch_size: int | Auto | None = Field(
        None, description=f"Examples per step ({BOUNDS['batch_size'].describe()})."
    )
    learning_rate_multiplier: float | Auto | None = Field(
        None, description=f"Multiplies the base learning rate {BASE_LEARNING_RATE:g} (AsFT paper)."
    )
    learning_rate: float | None = _bounded(
        "learning_rate", "Absolute learning rate (instead of the multiplier)."
    )
    lambda_: float | None = Field(
        None,
        alias="lambda",
        description="Penalty weight (asft, asft_projector, l2; default per method).",
        **BOUNDS["lambda"].field_kwargs(),
    )
    subspace_energy: float | None = _bounded(
        "subspace_energy",
        "asft_projector: share of ||V||_F^2 the free subspace holds "
        f"(default {DEFAULT_SUBSPACE_ENERGY:g}).",
    )
    rank: int | None = _bounded("rank", "LoRA rank r.")
    alpha: float | None = _bounded("alpha", "LoRA alpha.")
    dropout: float | None = _bounded("dropout", "LoRA dropout.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TARGET_MODULES,
        description="Modules that get LoRA (q_proj, v_proj).",
    )
    safelora_threshold: float | None = _bounded(
        "safelora_threshold", "Safe LoRA: project modules whose similarity is below."
    )
    safelora_num_modules: int | None = _bounded(
        "safelora_num_modules", "Safe LoRA: project the N least similar modules."
    )
    max_seq_len: int | None = _bounded("max_seq_len")
    gradient_accumulation_steps: int | None = _bounded("gradient_accumulation_steps")
    warmup_steps: int | None = _bounded("warmup_steps")
    penalty_rank: int | None = _bounded(
        "penalty_rank", "Keep the top-k eigenpairs of C (exact when unset)."
    )

    # Only the documented name: "lambda_" is an unknown field.
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier")
    @classmethod
    def _auto_or_bounded(cls, value: float | str | None, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return _check_auto_or_bounded(info.field_name, value)

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name")
        return value

    @model_validator(mode="after")
    def _exclusive(self) -> Hyperparameters:
        if self.safelora_threshold is not None and self.safelora_num_modules is not None:
            raise ValueError("give safelora_threshold or safelora_num_modules, not both")
        if self.learning_rate is not None and self.learning_rate_multiplier not in (None, "auto"):
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return self

    def given(self) -> dict[str, Any]:
        """The fields that were set, by their JSON names."""
        return self.model_dump(exclude_none=True, by_alias=True)


def check_applicable(method_type: str, given: Hyperparameters) -> None:
    """Raise ``ValueError`` for a parameter ``method_type`` does not use."""
    unused = unused_parameters(method_type, given.given())
    if unused:
        raise ValueError(f"{', '.join(unused)} not used by method {method_type}")


class MethodBlock(Strict):
    """``{"hyperparameters": {...}}`` under the method's type."""

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    """``{"type": "asft", "asft": {"hyperparameters": {...}}}``."""

    type: MethodType
    supervised: MethodBlock | None = None
    asft: MethodBlock | None = None
    asft_projector: MethodBlock | None = None
    l2: MethodBlock | None = None
    safelora: MethodBlock | None = None
    asft_safelora: MethodBlock | None = Field(None, alias="asft+safelora")

    # Only the documented name: "asft_safelora" is an unknown field.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _one_block(self) -> Method:
        for name in METHODS:
            block = getattr(self, name.replace("+", "_"))
            if block is not None and name != self.type:
                raise ValueError(f"method.{name} given but method.type is {self.type}")
        check_applicable(self.type, self.block().hyperparameters)
        return self

    def block(self) -> MethodBlock:
        """The hyperparameter block of the chosen type (empty when not given)."""
        found: MethodBlock | None = getattr(self, self.type.replace("+", "_"))
        return found or MethodBlock()


class DataPolicyBody(Strict):
    """What the job does with the training rows the safety scan flagged."""

    mode: DataPolicyMode = Field(
        DataPolicy().mode,
        description="flag: train on them and report them; drop_flagged: train without them; "
        "refuse: fail (training_data_unsafe) above max_flagged_share.",
    )
    max_flagged_share: float = Field(
        DataPolicy().max_flagged_share,
        ge=0,
        le=1,
        description="refuse: the share of flagged rows above which the job fails.",
    )

    def policy(self) -> DataPolicy:
        """The core's typed policy."""
        return DataPolicy(self.mode, self.max_flagged_share)


class EvaluationSpec(Strict):
    """How to score task accuracy: a matcher on a held-out prompt/completion file."""

    matcher: Matcher = Field("exact_label", description=f"One of {', '.join(MATCHERS)}.")
    pattern: str | None = Field(None, max_length=1000, description="Required for regex.")
    file: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="File id of the held-out set; default: the validation file.",
    )
    max_examples: int | None = Field(None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _pattern(self) -> EvaluationSpec:
        if self.matcher == "regex":
            if not self.pattern:
                raise ValueError("the regex matcher needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"invalid regex: {error}") from None
        return self


class JobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model: str = Field(min_length=1, max_length=128, pattern=PLAIN_TEXT, examples=["tiny-chat"])
    training_file: str = Field(min_length=1, max_length=64, examples=["file-abc123"])
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    hyperparameters: Hyperparameters | None = Field(
        None, description="OpenAI's older place for n_epochs, batch_size, lr multiplier."
    )
    method: Method | None = Field(None, description=f"Default: {{'type': '{DEFAULT_METHOD}'}}.")
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 pairs: keys of 1-64 characters, values of at most 512."
    )
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported.")
    evaluation: EvaluationSpec | None = None
    data_policy: DataPolicyBody | None = Field(
        None, description="Default: the team's, else flag (train on flagged rows, report them)."
    )
    auto_start: bool = Field(
        True, description="False: validate only, stop in 'validated'; POST .../start queues it."
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # as Strict: no "3" for 3, no 1 for true
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-chat",
                    "training_file": "file-abc123",
                    "method": {"type": "asft", "asft": {"hyperparameters": {"lambda": 1.0}}},
                    "suffix": "support-bot",
                }
            ]
        },
    )

    @model_validator(mode="after")
    def _blocks_agree(self) -> JobCreate:
        if self.hyperparameters is not None:
            method = self.method or Method(type=DEFAULT_METHOD)
            check_applicable(method.type, self.hyperparameters)
            # Each block is valid alone; merged (as job_spec does) they must be too,
            # e.g. not a threshold in one and a module count in the other.
            merged = {**self.hyperparameters.given(), **method.block().hyperparameters.given()}
            try:
                Hyperparameters.model_validate(merged)
            except ValidationError as error:
                raise ValueError(error.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > METADATA_MAX_KEYS:
                raise ValueError(f"metadata holds at most {METADATA_MAX_KEYS} keys")
            for key, item in value.items():
                check_metadata_pair(key, item)
        return value


def job_spec(request: JobCreate) -> JobSpec:
    """The request's method with every hyperparameter resolved to the value it trains with.

    ``hyperparameters`` (OpenAI's older place) is read first, the method's block over it.
    """
    method = request.method or Method(type=DEFAULT_METHOD)
    legacy = request.hyperparameters or Hyperparameters()
    return JobSpec.resolve(
        method.type, {**legacy.given(), **method.block().hyperparameters.given()}
    )


class JobEvent(BaseModel):
    """A ``fine_tuning.job.event``; ``metrics`` events carry step, loss, penalty, lr, tokens/s."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class JobCheckpoint(BaseModel):
    """A ``fine_tuning.job.checkpoint``."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuning_job_id: str


class MetricPoint(BaseModel):
    """The steps of one bucket: the last step, how many there were, and their means."""

    step: int
    steps: int
    train_loss: float | None
    train_loss_min: float | None
    train_loss_max: float | None
    penalty: float | None
    learning_rate: float | None


class ValidationPoint(BaseModel):
    """The loss on the whole validation file at a checkpoint."""

    step: int
    full_valid_loss: float


class JobMetrics(BaseModel):
    """A job's training curves at most ``resolution`` points long."""

    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    fine_tuning_job_id: str
    resolution: int
    bucket_steps: int = Field(description="steps averaged into each point")
    steps_recorded: int
    last_step: int | None
    total_steps: int | None
    data: list[MetricPoint]
    validation: list[ValidationPoint]


class JobReport(BaseModel):
    """The evaluation of a job's adapter: safety and utility, per category, failing prompts."""

    object: Literal["fine_tuning.job.report"] = "fine_tuning.job.report"
    fine_tuning_job_id: str
    created_at: int
    approved: bool
    report: dict[str, Any]
