"""The embedded inference server: OpenAI's chat completions and vLLM's runtime adapter calls.

It speaks the protocol the API forwards to, the same one ``vllm serve --enable-lora`` speaks
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``POST /v1/chat/completions`` (streamed as
server-sent events when asked), ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``GET /v1/models`` and ``GET /health``. The load call also takes ``base_model`` (the folder of
the adapter's base), which vLLM does not need: it serves one base. Only the API should reach
this server: it loads any model folder it is named.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from asft_core.serving import Delta, Engine, EngineError, Sampling
from inference.protocol import ChatRequest, LoadAdapter, UnloadAdapter, error_body


def _error(error: EngineError) -> JSONResponse:
    return JSONResponse(error_body(error.code, str(error), error.status, error.param), error.status)


def sampling_of(body: ChatRequest) -> Sampling:
    """The engine's sampling settings of a request."""
    return Sampling(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def _chunk(ident: str, created: int, model: str, **fields: Any) -> str:
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
    return f"data: {json.dumps({**body, **fields})}\n\n"


def create_app(engine: Engine) -> FastAPI:
    """The server's app over ``engine``."""
    app = FastAPI(title="asft inference", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        code = "invalid_value" if param else "invalid_request"
        return JSONResponse(error_body(code, f"{param}: {first['msg']}", 400, param), 400)

    @app.get("/health", response_model=None)
    def health() -> dict[str, Any] | JSONResponse:
        if not engine.alive:
            return JSONResponse(error_body("engine_stopped", "the decode loop ended", 503), 503)
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [{"object": "model", "created": 0, "owned_by": "asft", **m} for m in engine.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", response_model=None)
    async def load(body: LoadAdapter) -> PlainTextResponse | JSONResponse:
        try:
            added = await to_thread.run_sync(
                engine.load_adapter, body.lora_name, body.lora_path, body.base_model
            )
        except EngineError as error:
            return _error(error)
        if not added:
            message = f"The lora adapter '{body.lora_name}' has already been loaded."
            return JSONResponse(error_body("adapter_already_loaded", message, 400), 400)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_model=None)
    async def unload(body: UnloadAdapter) -> PlainTextResponse | JSONResponse:
        try:
            await to_thread.run_sync(engine.unload_adapter, body.lora_name)
        except EngineError as error:
            return _error(error)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> JSONResponse | StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def emit(delta: Delta) -> None:  # called on the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        try:
            cancel = await to_thread.run_sync(
                engine.submit,
                body.model,
                [m.as_message() for m in body.messages],
                sampling_of(body),
                emit,
            )
        except EngineError as error:
            return _error(error)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                text, last = "", None
                while last is None:
                    try:
                        delta = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except TimeoutError:
                        if await request.is_disconnected():  # stop decoding for no one
                            return _error(EngineError("client_gone", "the client left", 499))
                        continue
                    if delta.error is not None:
                        return _error(delta.error)
                    text += delta.text
                    last = delta if delta.finish_reason else None
            finally:
                cancel.set()
            return JSONResponse(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": last.finish_reason,
                            "logprobs": None,
                        }
                    ],
                    "usage": _usage(last),
                }
            )
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            try:
                role = {"role": "assistant", "content": ""}
                yield _chunk(ident, created, body.model, choices=[_choice(role, None)])
                while True:
                    delta = await queue.get()
                    if delta.error is not None:
                        error = delta.error
                        yield f"data: {json.dumps(error_body(error.code, str(error), 500))}\n\n"
                        return
                    if delta.text or delta.finish_reason:
                        piece = {"content": delta.text} if delta.text else {}
                        choice = _choice(piece, delta.finish_reason)
                        yield _chunk(ident, created, body.model, choices=[choice])
                    if delta.finish_reason:
                        if usage:
                            counts = _usage(delta)
                            yield _chunk(ident, created, body.model, choices=[], usage=counts)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                cancel.set()  # the client went away, or the answer is complete

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def _usage(last: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }
