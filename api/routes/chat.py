"""``/v1/chat/completions``: OpenAI's chat completions on registered pairs and fine-tuned models.

The route checks who may use the model (``service.inference.chat_target``) and forwards the
request to the model's inference server, streaming its answer through. When the server lacks
an adapter (first use, or it restarted and forgot it), the adapter is loaded and the request
sent again once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import CurrentTeam, read_in_session
from api.errors import ApiError, refused
from api.schemas.common import errors
from inference.protocol import ChatCompletion, ChatRequest
from service.inference import ChatTarget, chat_target, is_loaded_answer, load_request
from service.jobs.create import Refused

router = APIRouter(tags=["chat"])
logger = logging.getLogger("asft.api")
RETRY_AFTER_S = 5


def unavailable(target: ChatTarget, why: str) -> ApiError:
    """503 ``engine_unavailable``, with when to try again."""
    return ApiError(
        "engine_unavailable",
        f"the inference server at {target.url} is unavailable ({why}); try again shortly",
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _refusal(target: ChatTarget, response: httpx.Response) -> ApiError:
    """The API's error for an inference server's error answer."""
    try:
        await response.aread()
    except httpx.HTTPError as broken:
        return unavailable(target, f"a broken answer: {type(broken).__name__}")
    finally:
        await response.aclose()
    if response.status_code == 404:
        # Known here (a pair, or a fine-tuned model whose adapter was just loaded), so the
        # server is not serving it: the embedded one serves pairs registered as folders.
        logger.warning("%s does not serve %s: %s", target.url, target.served_name, response.text)
        return ApiError(
            "model_not_served",
            f"the inference server at {target.url} does not serve this model "
            "(the embedded engine serves model pairs registered as local folders)",
            "model",
            status_code=404,
        )
    if response.status_code == 503:
        return ApiError(
            "engine_loading",
            "the inference server is loading; try again shortly",
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if response.status_code >= 500:
        return unavailable(target, f"it answered {response.status_code}")
    try:
        detail = response.json()["error"]
        code, message, param = detail.get("code"), detail["message"], detail.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, param = None, response.text[:500], None
    return ApiError(
        str(code or "invalid_request"), message, param, status_code=response.status_code
    )


async def _send(
    client: httpx.AsyncClient, target: ChatTarget, payload: dict[str, Any]
) -> httpx.Response:
    """Send the request (streamed), loading the adapter and retrying once if it is missing."""
    url = f"{target.url}/v1/chat/completions"
    try:
        response = await client.send(client.build_request("POST", url, json=payload), stream=True)
        if response.status_code != 404 or target.adapter_path is None:
            return response
        await response.aclose()
        loaded = await client.post(f"{target.url}/v1/load_lora_adapter", json=load_request(target))
        if not is_loaded_answer(loaded):
            # The adapter's files are the service's, not the user's: say so, log the detail.
            logger.error("%s could not load %s: %s", target.url, target.served_name, loaded.text)
            raise ApiError(
                "adapter_load_failed",
                "the inference server could not load this model's adapter; the operators "
                "have the details",
                "model",
                status_code=502,
            )
        return await client.send(client.build_request("POST", url, json=payload), stream=True)
    except httpx.HTTPError as error:
        raise unavailable(target, type(error).__name__) from None


def _renamed(line: str, model: str) -> str:
    """An event line with the user's model id in it (the server knows the model by another)."""
    if not line.startswith("data: {"):
        return line
    chunk = json.loads(line[len("data: ") :])
    if "model" in chunk:
        chunk["model"] = model
    return "data: " + json.dumps(chunk)


async def _relay(
    client: httpx.AsyncClient, response: httpx.Response, target: ChatTarget, model: str
) -> AsyncIterator[str]:
    """The server's event stream, renamed; a broken stream ends with an error event."""
    try:
        async for line in response.aiter_lines():
            if line:
                yield _renamed(line, model) + "\n\n"
    except (httpx.HTTPError, ValueError) as error:
        failure = unavailable(target, f"the stream broke: {type(error).__name__}")
        body = {"error": {"message": failure.message, "type": "server_error", "code": failure.code}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        # Shielded: when the client left, this scope is cancelled, and the closes must still
        # run (closing the stream is what tells the server to stop decoding).
        with anyio.CancelScope(shield=True):
            await response.aclose()
            await client.aclose()


# One server-sent event, as OpenAPI 3.2 describes a stream's items: its data is a JSON
# chunk, or `[DONE]` (not JSON, so no contentMediaType here).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON `chat.completion.chunk`, an error object, or `[DONE]`",
        }
    },
}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "model": ChatCompletion,
            "description": "The answer; with `stream: true`, server-sent `chat.completion.chunk`"
            " events ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **errors(403, 404, 502, 503),
    },
    summary="Chat with a model pair, a fine-tuned model or a checkpoint",
)
async def chat_completions(
    request: Request, team: CurrentTeam, body: ChatRequest
) -> JSONResponse | StreamingResponse:
    """OpenAI's chat completions; ``stream: true`` answers with server-sent events.

    ``model`` is a registered pair's id, one of the team's fine-tuned models or a checkpoint's
    ``fine_tuned_model_checkpoint``. Adapters that failed the safety gate, and checkpoints,
    are refused (403 ``adapter_not_approved``) unless the team's admin allowed them. An
    unreachable or loading inference server is a 503 with ``Retry-After``.
    """
    settings, store = request.app.state.settings, request.app.state.store
    try:
        target = await read_in_session(
            request, lambda session: chat_target(session, team, body.model, store, settings)
        )
    except Refused as error:
        raise refused(error) from None
    # ignore_eos (vLLM's benchmark switch) is not forwarded: it would let one request hold
    # the engine for a whole context.
    fields = body.model_dump(exclude_unset=True, exclude={"ignore_eos"})
    payload = {**fields, "model": target.served_name}
    timeout = httpx.Timeout(settings.inference_timeout_s, connect=5.0)
    client = httpx.AsyncClient(timeout=timeout)
    try:
        response = await _send(client, target, payload)
        if response.status_code >= 400:
            raise await _refusal(target, response)
    except BaseException:
        await client.aclose()
        raise
    if body.stream:
        return StreamingResponse(
            _relay(client, response, target, body.model), media_type="text/event-stream"
        )
    try:
        answer = json.loads(await response.aread())
    except (httpx.HTTPError, ValueError) as error:
        raise unavailable(target, f"a broken answer: {type(error).__name__}") from None
    finally:
        await response.aclose()
        await client.aclose()
    if not isinstance(answer, dict):
        raise unavailable(target, "an answer that is not a JSON object")
    answer["model"] = body.model
    return JSONResponse(answer)
