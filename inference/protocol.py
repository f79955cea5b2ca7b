"""The wire protocol of chat completions, shared by the API and the embedded server.

OpenAI's chat completion request (the fields served here), vLLM's runtime adapter calls, and
OpenAI's error envelope. Pydantic only: the API imports it and never loads torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from asft_core.formats import Message


def error_body(code: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ContentPart(BaseModel):
    """A text part of a message (other kinds are refused: the models here read text only)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_message(self) -> Message:
        """The core's message (``developer`` is OpenAI's newer name for ``system``)."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return Message("system" if self.role == "developer" else self.role, text)


class StreamOptions(BaseModel):
    """``stream_options``: a last chunk with the token counts."""

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request this service serves."""

    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, Field(min_length=1, max_length=512)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int | None, Field(ge=-(2**63), lt=2**63)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    @property
    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple of non-empty strings."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class LoadAdapter(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body, plus the base to put it on."""

    lora_name: Annotated[str, Field(min_length=1, max_length=512)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]
    base_model: Annotated[str | None, Field(max_length=4096)] = None


class UnloadAdapter(BaseModel):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    lora_name: Annotated[str, Field(min_length=1, max_length=512)]


class AnswerMessage(BaseModel):
    """The assistant's message of a non-streamed answer."""

    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    """One answer (``n`` is 1)."""

    index: int
    message: AnswerMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's ``chat.completion`` object: the answer when ``stream`` is false."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
