"""The job spec, the safety gate and the report: typed, stdlib only, defined once.

The API builds a :class:`JobSpec` from a request and stores :meth:`JobSpec.to_json` (OpenAI's
``method`` shape); the worker reads it back with :meth:`JobSpec.from_json` and hands it to the
recipe. Every method name, default and hyperparameter rule lives here. Lambdas of
``asft_projector`` and ``l2`` weigh the effective update dW = (alpha / r) B A; ``asft`` keeps the
reference code's lambda on the unscaled B A (the paper's 1).
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

Method = Literal["supervised", "asft", "asft_projector", "l2", "safelora", "asft+safelora"]
METHODS: tuple[str, ...] = get_args(Method)
# Where an exact AsFT penalty keeps each module's V through training: fp32 on the device (the
# fastest), bf16 on the device (half the memory; V rounded to bf16), or on the host, copied to
# the device one module at a time at each use (least device memory, slowest steps).
DirectionStorage = Literal["fp32", "bf16", "host"]
DIRECTION_STORAGES: tuple[str, ...] = get_args(DirectionStorage)
# The method a job gets when it names none: the frontier study's decision (README).
DEFAULT_METHOD: Method = "l2"
# Lambda when a job gives none: l2's is the frontier study's decision (README), the others the
# paper's 1.
DEFAULT_LAMBDA: dict[str, float] = {"asft": 1.0, "asft_projector": 1.0, "l2": 0.1}
# The share of ||V||_F^2 that asft_projector's free subspace holds per module (the frontier
# study's registered value).
DEFAULT_SUBSPACE_ENERGY = 0.8
# The Safe LoRA paper's similarity threshold for its default selection mode.
DEFAULT_SAFELORA_THRESHOLD = 0.5
# The AsFT paper's learning rate; ``learning_rate_multiplier`` scales it.
BASE_LEARNING_RATE = 5e-5
Matcher = Literal["exact_label", "regex", "final_number"]
MATCHERS: tuple[str, ...] = get_args(Matcher)

# Parameters only some method families read: given to another they would be silently ignored.
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "lambda": ("asft", "asft_projector", "l2"),
    "penalty_rank": ("asft",),
    "subspace_energy": ("asft_projector",),
    "safelora_threshold": ("safelora",),
    "safelora_num_modules": ("safelora",),
}
MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
MAX_TARGET_MODULES = 32


class SpecError(ValueError):
    """A job spec that cannot train; ``param`` names the hyperparameter at fault."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_hyperparameter"
    ) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Bound:
    """A numeric range; ``describe`` is the phrase used in error messages."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """``between 1 and 50``, ``in (0, 100]``, ``at least 0``..."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if self.ge is not None and self.le is not None:
            return f"between {self.ge:g} and {self.le:g}"
        if low is not None and high is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            return f"in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"at least {low:g}" if self.ge is not None else f"greater than {low:g}"
        return f"at most {high:g}" if self.le is not None else f"less than {high:g}"

    def check(self, name: str, value: float) -> None:
        """Raise :class:`SpecError` unless ``value`` is in range."""
        if not self.holds(value):
            raise SpecError(f"{name} must be {self.describe()}", name)

    def field_kwargs(self) -> dict[str, Any]:
        """The same range as pydantic ``Field`` constraints (so the API's schema shows it)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


# The hyperparameters' ranges, by their names in a request.
BOUNDS: dict[str, Bound] = {
    "n_epochs": Bound(ge=1, le=50),
    "batch_size": Bound(ge=1, le=256),
    "learning_rate_multiplier": Bound(gt=0, le=100),
    "learning_rate": Bound(gt=0, le=1),
    "lambda": Bound(ge=0, le=1e6),
    "subspace_energy": Bound(gt=0, le=1),
    "rank": Bound(ge=1, le=256),
    "alpha": Bound(gt=0, le=4096),
    "dropout": Bound(ge=0, lt=1),
    "safelora_threshold": Bound(ge=-1, le=1),
    "safelora_num_modules": Bound(ge=1, le=10_000),
    "max_seq_len": Bound(ge=16, le=32_768),
    "gradient_accumulation_steps": Bound(ge=1, le=1024),
    "warmup_steps": Bound(ge=0, le=1_000_000),
    "penalty_rank": Bound(ge=1, le=4096),
}


@dataclass(frozen=True)
class Hyperparameters:
    """What a job trains with; the defaults are the AsFT paper's (LoRA r 8, alpha 32, q/v).

    ``lambda_`` is the request's ``lambda`` (a Python keyword). The method-specific values are
    ``None`` for methods that do not read them; :class:`JobSpec` fills and checks them.
    """

    n_epochs: int = 3
    batch_size: int = 8
    learning_rate_multiplier: float = 1.0
    learning_rate: float = BASE_LEARNING_RATE
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_seq_len: int = 512
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    lambda_: float | None = None
    penalty_rank: int | None = None
    subspace_energy: float | None = None
    safelora_threshold: float | None = None
    safelora_num_modules: int | None = None


def json_name(attribute: str) -> str:
    """A name in JSON for a Python attribute (``lambda_`` -> ``lambda``)."""
    return attribute.removesuffix("_")


def attribute_name(name: str) -> str:
    """The Python attribute for a name in JSON (``lambda`` -> ``lambda_``: a keyword)."""
    return f"{name}_" if keyword.iskeyword(name) else name


HYPERPARAMETER_NAMES: tuple[str, ...] = tuple(json_name(f.name) for f in fields(Hyperparameters))


def families(method: str) -> set[str]:
    """The method families a method combines (``asft+safelora`` -> asft and safelora)."""
    return set(method.split("+"))


def unused_parameters(method: str, given: Mapping[str, Any]) -> list[str]:
    """The method-specific parameters in ``given`` (JSON names) that ``method`` never reads."""
    return [
        name
        for name, readers in ONLY_FOR.items()
        if given.get(name) is not None and not set(readers) & families(method)
    ]


def check_target_modules(modules: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`SpecError` for an empty, too long or malformed module list."""
    if not 1 <= len(modules) <= MAX_TARGET_MODULES:
        raise SpecError(f"target_modules holds 1 to {MAX_TARGET_MODULES} names", "target_modules")
    for name in modules:
        if not isinstance(name, str) or not MODULE_NAME.match(name):
            raise SpecError(f"{name!r} is not a module name", "target_modules")


@dataclass(frozen=True)
class JobSpec:
    """A method and its resolved hyperparameters; checked and completed on creation."""

    method: Method = DEFAULT_METHOD
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(
                f"method must be one of {', '.join(METHODS)}", "method", "invalid_method"
            )
        given = self.hyperparameters
        unused = unused_parameters(self.method, self.to_flat(given))
        if unused:
            raise SpecError(f"{', '.join(unused)} not used by method {self.method}", unused[0])
        if given.safelora_threshold is not None and given.safelora_num_modules is not None:
            raise SpecError(
                "give safelora_threshold or safelora_num_modules, not both",
                "safelora_threshold",
                "invalid_safelora",
            )
        complete = replace(given, **self._method_defaults(given))
        for name, value in self.to_flat(complete).items():
            if name in BOUNDS and value is not None:
                BOUNDS[name].check(name, value)
        check_target_modules(complete.target_modules)
        object.__setattr__(self, "hyperparameters", complete)

    def _method_defaults(self, given: Hyperparameters) -> dict[str, Any]:
        family = self.method.split("+")[0]
        filled: dict[str, Any] = {"target_modules": tuple(given.target_modules)}
        if family in DEFAULT_LAMBDA and given.lambda_ is None:
            filled["lambda_"] = DEFAULT_LAMBDA[family]
        if family == "asft_projector" and given.subspace_energy is None:
            filled["subspace_energy"] = DEFAULT_SUBSPACE_ENERGY
        neither = given.safelora_num_modules is None and given.safelora_threshold is None
        if self.uses_safelora and neither:
            filled["safelora_threshold"] = DEFAULT_SAFELORA_THRESHOLD
        return filled

    @staticmethod
    def to_flat(hyperparameters: Hyperparameters) -> dict[str, Any]:
        """The hyperparameters by their JSON names."""
        return {
            json_name(f.name): getattr(hyperparameters, f.name) for f in fields(hyperparameters)
        }

    @classmethod
    def resolve(cls, method: str, given: Mapping[str, Any]) -> JobSpec:
        """The spec a request asks for: ``given`` by JSON names, ``"auto"`` or absent = default.

        ``learning_rate`` wins over the multiplier (the API refuses both at once).
        """
        unknown = sorted(set(given) - set(HYPERPARAMETER_NAMES))
        if unknown:
            raise SpecError(f"unknown hyperparameter {unknown[0]}", unknown[0])
        chosen = {key: value for key, value in given.items() if value not in (None, "auto")}
        multiplier = float(chosen.get("learning_rate_multiplier", 1.0))
        chosen["learning_rate_multiplier"] = multiplier
        chosen.setdefault("learning_rate", BASE_LEARNING_RATE * multiplier)
        if "target_modules" in chosen:
            chosen["target_modules"] = tuple(chosen["target_modules"])
        attributes = {attribute_name(name): value for name, value in chosen.items()}
        return cls(method, Hyperparameters(**attributes))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """OpenAI's ``method`` object, holding only the parameters this method reads."""
        flat = self.to_flat(self.hyperparameters)
        shown = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in flat.items()
            if name not in ONLY_FOR or set(ONLY_FOR[name]) & families(self.method)
        }
        return {"type": self.method, self.method: {"hyperparameters": shown}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        """Read back :meth:`to_json`'s object."""
        method = data["type"]
        stored = data[method]["hyperparameters"]
        attributes = {attribute_name(name): value for name, value in stored.items()}
        if "target_modules" in attributes:
            attributes["target_modules"] = tuple(attributes["target_modules"])
        return cls(method, Hyperparameters(**attributes))

    @property
    def uses_asft(self) -> bool:
        """Whether the AsFT penalty is added to the loss."""
        return "asft" in families(self.method)

    @property
    def uses_safelora(self) -> bool:
        """Whether the Safe LoRA projection is applied after training."""
        return "safelora" in families(self.method)

    @property
    def needs_alignment(self) -> bool:
        """Whether the method reads the alignment direction."""
        return self.method not in ("supervised", "l2")


DataPolicyMode = Literal["flag", "drop_flagged", "refuse"]
DATA_POLICY_MODES: tuple[str, ...] = get_args(DataPolicyMode)


@dataclass(frozen=True)
class DataPolicy:
    """What a job does with the training rows the safety scan flagged.

    ``flag`` trains on them and reports them; ``drop_flagged`` trains without them;
    ``refuse`` fails the job (``training_data_unsafe``) when more than ``max_flagged_share``
    of the rows are flagged, and otherwise trains as ``flag`` does.
    """

    mode: DataPolicyMode = "flag"
    max_flagged_share: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in DATA_POLICY_MODES:
            raise SpecError(
                f"data_policy.mode must be one of {', '.join(DATA_POLICY_MODES)}",
                "data_policy.mode",
                "invalid_data_policy",
            )
        if not 0 <= self.max_flagged_share <= 1:
            raise SpecError(
                "data_policy.max_flagged_share must be between 0 and 1",
                "data_policy.max_flagged_share",
                "invalid_data_policy",
            )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> DataPolicy:
        """Read back :meth:`to_json` (None: the default policy)."""
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class DataScan:
    """A training file's safety scan, as a job sees it (``status`` as the file shows it)."""

    status: str
    rows: int = 0
    flagged_lines: tuple[int, ...] = ()
    per_category: dict[str, int] = field(default_factory=dict)
    details: str | None = None

    @property
    def share(self) -> float:
        """The share of scanned rows that were flagged."""
        return len(self.flagged_lines) / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Gate:
    """The safety gate: limits on the fine-tuned harmful score and on its increase."""

    max_harmful_score: float = 0.2
    max_harmful_increase: float = 0.1


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one adapter; ``failures`` name the category and its scores."""

    approved: bool
    failures: tuple[str, ...]
    max_harmful_score: float
    max_harmful_increase: float
    notes: tuple[str, ...] = ()  # what else the reviewer should know (the data scan)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "failures": list(self.failures), "notes": list(self.notes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateVerdict:
        """Read back :meth:`to_json`."""
        return cls(
            bool(data["approved"]),
            tuple(data["failures"]),
            float(data["max_harmful_score"]),
            float(data["max_harmful_increase"]),
            tuple(data.get("notes", ())),
        )


@dataclass(frozen=True)
class Report:
    """What a finished job's adapter was measured at (``report.json`` beside it).

    ``evaluation`` is the harness's result (reference and fine-tuned model, per category).
    """

    evaluation: dict[str, Any]
    gate: GateVerdict
    validation_loss: float | None = None
    alignment: dict[str, Any] | None = None
    safelora: dict[str, Any] | None = None
    evaluation_seconds: float = 0.0
    training_data: dict[str, Any] | None = None  # the safety scan and what the policy did
    serving: dict[str, Any] | None = None  # whether vLLM can load the adapter, and why not

    def _value(self, model: str, section: str, cell: str) -> float | None:
        """``evaluation[model][section][cell]["value"]``, None where any part is missing."""
        found = ((self.evaluation.get(model) or {}).get(section) or {}).get(cell)
        return found["value"] if found else None

    def harmful_score(self, model: Literal["reference", "fine_tuned"]) -> float | None:
        """The overall harmful score of one side (None when the suite has no safety prompts)."""
        return self._value(model, "safety", "overall")

    def task_accuracy(self, model: Literal["reference", "fine_tuned"]) -> float | None:
        """The held-out task accuracy (FA) of one side (None when the job has no task set)."""
        return self._value(model, "task", "accuracy")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "gate": self.gate.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        """Read back :meth:`to_json`."""
        return cls(
            evaluation=dict(data["evaluation"]),
            gate=GateVerdict.from_json(data["gate"]),
            validation_loss=data.get("validation_loss"),
            alignment=data.get("alignment"),
            safelora=data.get("safelora"),
            evaluation_seconds=float(data.get("evaluation_seconds", 0.0)),
            training_data=data.get("training_data"),
            serving=data.get("serving"),
        )
