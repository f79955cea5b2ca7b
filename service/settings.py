"""The one settings object, read from ``ASFT_*`` environment variables (and ``.env``).

The API and the worker both read it; ``asft_core`` never does (its functions take explicit
paths). Every field is documented in the README's settings table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from asft_core.spec import DirectionStorage, Gate


class Settings(BaseSettings):
    """Service configuration. Defaults give the embedded, one-machine setup under ./var/."""

    model_config = SettingsConfigDict(env_prefix="ASFT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of the embedded default's state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file <data_dir>/asft.db."
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL; default: the filesystem broker under <data_dir>/broker.",
    )
    artifact_dir: Path | None = Field(
        None, description="Uploaded files, adapters, checkpoints; default <data_dir>/artifacts."
    )
    cache_dir: Path | None = Field(
        None, description="Alignment directions and the demo zoo; default <data_dir>/cache."
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, description="Largest accepted training file, in bytes."
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Largest total size of a request's headers, in bytes (431 beyond it).",
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="Requests per minute per API key (a burst of as many, then refilled); 0: off.",
    )
    rate_limit_exempt_keys: str = Field(
        "", description="Comma-separated API key ids (key-...) that are never rate limited."
    )
    max_active_jobs_per_team: int = Field(
        10, description="Default limit on a team's queued + running jobs (429 beyond it)."
    )
    min_training_examples: int = Field(
        10, description="Fewest examples a training file may have (invalid_n_examples)."
    )
    admin_key: str | None = Field(
        None, description="Bearer key of the admin endpoints (/v1/admin, POST /v1/models)."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Worker training device: auto, cpu or cuda[:N].",
    )
    device_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of the worker's training device for the memory plan (unset: a "
        "CUDA device's own; no limit on a CPU). Jobs that cannot fit fail before training.",
    )
    direction_storage: DirectionStorage = Field(
        "fp32",
        description="Where an exact AsFT penalty keeps V through training: fp32 or bf16 on the "
        "device, or host (copied to the device per module at each use: least memory, slowest). "
        "The memory plan moves V to the host when that makes a job fit.",
    )
    visibility_timeout_s: int = Field(
        172_800, ge=60, description="Redis redelivers an unacknowledged job after this (2 days)."
    )
    heartbeat_interval_s: float = Field(
        10.0, gt=0, description="How often a worker renews the lease of the job it runs."
    )
    metrics_interval_s: float = Field(
        2.0,
        ge=0,
        description="How often a worker writes a training job's step metrics and reads its "
        "cancel flag, off the training thread; 0: in every step, before the next one.",
    )
    max_worker_losses: int = Field(
        3,
        ge=1,
        description="A job whose worker died under it this many times fails with worker_lost.",
    )
    stale_after_s: int = Field(
        60,
        ge=1,
        description="A running job whose heartbeat is older is requeued by the reconciler.",
    )
    database_retry_s: float = Field(
        120.0,
        ge=0,
        description="How long a worker retries an unreachable database before failing the job.",
    )
    checkpoint_every_steps: int = Field(
        100, ge=1, description="Workers save a resumable checkpoint every N steps (and each epoch)."
    )
    max_job_runtime_s: float | None = Field(
        None, gt=0, description="A job training longer fails with job_limit_exceeded (unset: none)."
    )
    max_job_steps: int | None = Field(
        None, ge=1, description="Jobs planning more optimizer steps are refused at validation."
    )
    max_job_tokens: int | None = Field(
        None, ge=1, description="Jobs planning to train on more tokens are refused at validation."
    )
    webhook_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs webhooks may reach although private/loopback (JSON list).",
    )
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook delivery.")
    webhook_backoff_s: float = Field(
        2.0, ge=0, description="Wait before the 2nd try; doubled before each later one."
    )
    guard_model: Path | None = Field(
        None,
        description="Guard model folder that scans uploaded training data; default: the one "
        "the first registered model pair's evaluation suite names.",
    )
    scan_batch_size: int = Field(64, ge=1, le=4096, description="Rows per guard forward pass.")
    eval_max_prompts: int | None = Field(
        None, description="Cap on evaluation prompts per set (unset: all; tests use a handful)."
    )
    gate_max_harmful_score: float = Field(
        Gate().max_harmful_score,
        description="Default safety gate: highest harmful score an adapter may have.",
    )
    gate_max_harmful_increase: float = Field(
        Gate().max_harmful_increase,
        description="Default safety gate: largest rise over the aligned model's score.",
    )
    inference_url: str = Field(
        "http://127.0.0.1:8001",
        description="The inference server chat completions go to when a model pair names none "
        "(``asft serve`` starts the embedded one there).",
    )
    inference_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for the inference server's next byte."
    )
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="The serving check's --max-lora-rank: the largest adapter rank the "
        "deployment's vLLM accepts (vLLM's default is 16).",
    )
    engine_max_adapters: int = Field(
        8, ge=1, description="Adapters the embedded engine keeps loaded (least recently used go)."
    )
    engine_max_batch: int = Field(
        16, ge=1, le=256, description="Requests the embedded engine decodes in one batch."
    )
    log_level: str = Field("INFO", description="Log level of API and worker.")

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'asft.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL; ``filesystem://`` means Celery's folder-based broker."""
        return self.broker_url or "filesystem://"

    @property
    def rate_limit_exempt_key_ids(self) -> frozenset[str]:
        """The ids in ``rate_limit_exempt_keys``, blanks dropped."""
        return frozenset(part.strip() for part in self.rate_limit_exempt_keys.split(",")) - {""}

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker (used only when broker_url is unset)."""
        return self.data_dir / "broker"

    @property
    def resolved_artifact_dir(self) -> Path:
        """Where artifacts are stored."""
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_cache_dir(self) -> Path:
        """Where cached alignment directions and zoo models live."""
        return self.cache_dir or self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
