"""``model`` objects: registered model pairs and the team's fine-tuned models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import PLAIN_TEXT

# A registered pair's id: letters and digits first, then also '.', '_' and '-'.
PAIR_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ModelObject(BaseModel):
    """A model a job can name (a registered pair) or a fine-tuned model (an adapter)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["model_pair", "fine_tuned"]
    base_model: str | None = Field(None, description="Model pairs: the base model.")
    aligned_model: str | None = Field(None, description="Model pairs: the model fine-tuned.")
    parent: str | None = Field(None, description="Fine-tuned models: the model pair.")
    job_id: str | None = None
    approved: bool | None = Field(None, description="Fine-tuned: passed the safety gate.")
    sha256: str | None = Field(None, description="Fine-tuned: the adapter archive's sha256.")
    alignment: dict[str, Any] | None = Field(
        None,
        description="Model pairs: the alignment direction's regime and spectrum "
        "(`asft alignment inspect`), once a job has computed it.",
    )
    inference_url: str | None = Field(
        None, description="Model pairs: the server chat completions go to (null: the default)."
    )


class ModelPairCreate(BaseModel):
    """``POST /v1/models`` (admin): register a base/aligned model pair."""

    id: str = Field(min_length=1, max_length=64, pattern=PAIR_ID_PATTERN)
    aligned_model: str = Field(
        min_length=1, max_length=1000, pattern=PLAIN_TEXT, description="Folder or hub id."
    )
    base_model: str = Field(
        min_length=1, max_length=1000, pattern=PLAIN_TEXT, description="Folder or hub id."
    )
    eval_suite: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        pattern=PLAIN_TEXT,
        description="Path of the pair's evaluation suite JSON.",
    )
    inference_url: str | None = Field(
        None,
        max_length=1000,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="The OpenAI-compatible server that serves this pair, e.g. a vLLM "
        "started with --enable-lora (default: the service's ASFT_INFERENCE_URL).",
    )
    served_model: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        pattern=PLAIN_TEXT,
        description="The name that server knows the aligned model by (vLLM: the model or "
        "--served-model-name it was started with; default: aligned_model).",
    )

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "llama-2-7b-chat",
                    "aligned_model": "meta-llama/Llama-2-7b-chat-hf",
                    "base_model": "meta-llama/Llama-2-7b-hf",
                }
            ]
        },
    )


class ModelDeleted(BaseModel):
    """The answer to deleting a fine-tuned model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
