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
    field_validator,
    model_validator,
)

from api.schemas.common import PLAIN_TEXT
from asft_core.methods import (
    DEFAULT_LAMBDA,
    DEFAULT_METHOD,
    DEFAULT_SUBSPACE_ENERGY,
    METHODS,
)
from asft_core.methods import Method as MethodType

METHOD_TYPES = METHODS
Auto = Literal["auto"]
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,64}$")

# Defaults: the AsFT paper's (rank 8, alpha 32, dropout 0.05, q/v, lr 5e-5, lambda 1).
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
BASE_LEARNING_RATE = 5e-5
DEFAULT_LORA = {"rank": 8, "alpha": 32.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
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


class Hyperparameters(Strict):
    """Training settings; every field is optional and ``auto`` means the default."""

    n_epochs: int | Auto | None = Field(None, description="Passes over the data (1 to 50).")
    batch_size: int | Auto | None = Field(None, description="Examples per step (1 to 256).")
    learning_rate_multiplier: float | Auto | None = Field(
        None, description="Multiplies the base learning rate 5e-5 (AsFT paper)."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Absolute learning rate (instead of the multiplier)."
    )
    lambda_: float | None = Field(
        None,
        alias="lambda",
        ge=0,
        le=1e6,
        description="Penalty weight (asft, asft_projector, l2; default per method).",
    )
    subspace_energy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="asft_projector: share of ||V||_F^2 the free subspace holds (0.8).",
    )
    rank: int | None = Field(None, ge=1, le=256, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, le=4096, description="LoRA alpha.")
    dropout: float | None = Field(None, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        None, min_length=1, max_length=32, description="Modules that get LoRA (q_proj, v_proj)."
    )
    safelora_threshold: float | None = Field(
        None, ge=-1, le=1, description="Safe LoRA: project modules whose similarity is below."
    )
    safelora_num_modules: int | None = Field(
        None, ge=1, le=10_000, description="Safe LoRA: project the N least similar modules."
    )
    max_seq_len: int | None = Field(None, ge=16, le=32_768)
    gradient_accumulation_steps: int | None = Field(None, ge=1, le=1024)
    warmup_steps: int | None = Field(None, ge=0, le=1_000_000)
    penalty_rank: int | None = Field(
        None, ge=1, le=4096, description="Keep the top-k eigenpairs of C (exact when unset)."
    )

    # Only the documented name: "lambda_" is an unknown field.
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 50:
            raise ValueError("n_epochs must be between 1 and 50")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("batch_size must be between 1 and 256")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not 0 < value <= 100:
            raise ValueError("learning_rate_multiplier must be in (0, 100]")
        return value

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name")
        return value

    @model_validator(mode="after")
    def _exclusive(self) -> Hyperparameters:
        if self.safelora_threshold is not None and self.safelora_num_modules is not None:
            raise ValueError("give safelora_threshold or safelora_num_modules, not both")
        if self.learning_rate is not None and self.learning_rate_multiplier not in (None, "auto"):
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return self


# Parameters only one family of methods reads, as (field, name in the request): given to
# another method they would be silently ignored.
# (field, name in the request) -> the method families that read it.
_ONLY_FOR: dict[tuple[str, str], tuple[str, ...]] = {
    ("lambda_", "lambda"): ("asft", "asft_projector", "l2"),
    ("penalty_rank", "penalty_rank"): ("asft",),
    ("subspace_energy", "subspace_energy"): ("asft_projector",),
    ("safelora_threshold", "safelora_threshold"): ("safelora",),
    ("safelora_num_modules", "safelora_num_modules"): ("safelora",),
}


def check_applicable(method_type: str, given: Hyperparameters) -> None:
    """Raise ``ValueError`` for a parameter ``method_type`` does not use."""
    families = method_type.split("+")
    unused = [
        name
        for (field, name), readers in _ONLY_FOR.items()
        if not set(readers) & set(families) and getattr(given, field) is not None
    ]
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
        for name in METHOD_TYPES:
            block = getattr(self, name.replace("+", "_"))
            if block is not None and name != self.type:
                raise ValueError(f"method.{name} given but method.type is {self.type}")
        check_applicable(self.type, self.block().hyperparameters)
        return self

    def block(self) -> MethodBlock:
        """The hyperparameter block of the chosen type (empty when not given)."""
        found: MethodBlock | None = getattr(self, self.type.replace("+", "_"))
        return found or MethodBlock()


class EvaluationSpec(Strict):
    """How to score task accuracy: a matcher on a held-out prompt/completion file."""

    matcher: Literal["exact_label", "regex", "final_number"] = "exact_label"
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
            # Each block is valid alone; merged (as resolve_method does) they must be too,
            # e.g. not a threshold in one and a module count in the other.
            merged = {
                **self.hyperparameters.model_dump(exclude_none=True, by_alias=True),
                **method.block().hyperparameters.model_dump(exclude_none=True, by_alias=True),
            }
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


def resolve_method(request: JobCreate) -> dict[str, Any]:
    """The method with every hyperparameter resolved to the number it trains with."""
    method = request.method or Method(type=DEFAULT_METHOD)
    given = method.block().hyperparameters
    legacy = request.hyperparameters or Hyperparameters()
    merged = {
        **legacy.model_dump(exclude_none=True),
        **given.model_dump(exclude_none=True),
    }
    epochs = merged.get("n_epochs", "auto")
    batch = merged.get("batch_size", "auto")
    multiplier = merged.get("learning_rate_multiplier", "auto")
    multiplier = 1.0 if multiplier == "auto" else float(multiplier)
    resolved: dict[str, Any] = {
        "n_epochs": DEFAULT_EPOCHS if epochs == "auto" else epochs,
        "batch_size": DEFAULT_BATCH_SIZE if batch == "auto" else batch,
        "learning_rate_multiplier": multiplier,
        "learning_rate": merged.get("learning_rate", BASE_LEARNING_RATE * multiplier),
        **{key: merged.get(key, value) for key, value in DEFAULT_LORA.items()},
        "max_seq_len": merged.get("max_seq_len", 512),
        "gradient_accumulation_steps": merged.get("gradient_accumulation_steps", 1),
        "warmup_steps": merged.get("warmup_steps", 0),
    }
    family = method.type.split("+")[0]
    if family in DEFAULT_LAMBDA:
        resolved["lambda"] = merged.get("lambda_", DEFAULT_LAMBDA[family])
    if family == "asft":
        resolved["penalty_rank"] = merged.get("penalty_rank")
    if family == "asft_projector":
        resolved["subspace_energy"] = merged.get("subspace_energy", DEFAULT_SUBSPACE_ENERGY)
    if method.type in ("safelora", "asft+safelora"):
        resolved["safelora_threshold"] = merged.get("safelora_threshold")
        resolved["safelora_num_modules"] = merged.get("safelora_num_modules")
        if resolved["safelora_threshold"] is None and resolved["safelora_num_modules"] is None:
            resolved["safelora_threshold"] = 0.5
    return {"type": method.type, method.type: {"hyperparameters": resolved}}


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


class JobReport(BaseModel):
    """The evaluation of a job's adapter: safety and utility, per category, failing prompts."""

    object: Literal["fine_tuning.job.report"] = "fine_tuning.job.report"
    fine_tuning_job_id: str
    created_at: int
    approved: bool
    report: dict[str, Any]
