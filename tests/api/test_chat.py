"""``/v1/chat/completions`` against a real embedded inference server (``asft infer`` as its own
process) on the tiny pair: the official ``openai`` client, streamed and not; a fine-tuned
model's greedy answer equals ``PeftModel.generate``; checkpoints are a second adapter served
without a restart; the gate refusal and its admin switch; tenancy; a server that forgot its
adapters; bad requests; and a server that is down.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from asft_core.zoo import ZooPaths
from service.db.models import FineTunedModel
from service.settings import Settings
from tests.api.conftest import ADMIN, auth, jsonl, sentiment_rows
from tests.api.finished_jobs import FinishedJob, create_job, finish_job, install_real_adapters
from tests.api.test_openai_client import base_url, sdk  # noqa: F401 - fixtures
from tests.conftest import free_port
from tests.core.test_serving import make_adapter, reference

pytestmark = pytest.mark.slow
PROMPT = "Classify the sentiment: I loved it."


@pytest.fixture
def settings(settings: Settings, inference_url: str) -> Settings:
    """The API's settings, pointed at the inference server."""
    return settings.model_copy(update={"inference_url": inference_url})


@pytest.fixture
def tiny_pair(client: TestClient, zoo: ZooPaths) -> str:
    """The zoo's pair registered (a real folder: the inference server loads it)."""
    response = client.post(
        "/v1/models",
        json={"id": "tiny", "aligned_model": str(zoo.aligned), "base_model": str(zoo.base)},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    return "tiny"


@pytest.fixture(scope="module")
def adapters(zoo: ZooPaths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat-adapters")
    return make_adapter(zoo, root / "final", 11), make_adapter(zoo, root / "checkpoint", 12)


@pytest.fixture
def finished(
    app: FastAPI,
    client: TestClient,
    team_key: str,
    tiny_pair: str,
    upload: Callable[..., dict[str, Any]],
    adapters: tuple[Path, Path],
) -> FinishedJob:
    """A succeeded job of team alpha whose adapter and checkpoint are real LoRA adapters."""
    training = str(upload(team_key, jsonl(sentiment_rows(20)))["id"])
    job = finish_job(app, create_job(client, team_key, tiny_pair, training))
    install_real_adapters(job, *adapters)
    return job


def chat(client: TestClient, key: str, **body: Any) -> httpx.Response:
    """``POST /v1/chat/completions`` with greedy defaults."""
    request = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=request, headers=auth(key))


def test_the_openai_client_chats_with_a_fine_tuned_model(
    sdk: openai.OpenAI,  # noqa: F811 - the fixture imported above
    finished: FinishedJob,
    zoo: ZooPaths,
    adapters: tuple[Path, Path],
) -> None:
    expected, tokens = reference(zoo, adapters[0], PROMPT)
    answer = sdk.chat.completions.create(
        model=finished.model_id,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=24,
    )
    assert answer.model == finished.model_id
    assert answer.choices[0].message.content == expected
    assert answer.usage is not None and answer.usage.completion_tokens == tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + tokens

    stream = sdk.chat.completions.create(
        model=finished.model_id,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_completion_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert {c.model for c in chunks} == {finished.model_id}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens

    base = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24
    )
    assert base.choices[0].message.content == reference(zoo, None, PROMPT)[0]


def test_checkpoints_need_the_admin_switch_and_load_without_a_restart(
    client: TestClient,
    finished: FinishedJob,
    team_key: str,
    zoo: ZooPaths,
    adapters: tuple[Path, Path],
    inference_url: str,
) -> None:
    checkpoints = client.get(
        f"/v1/fine_tuning/jobs/{finished.job_id}/checkpoints", headers=auth(team_key)
    ).json()["data"]
    checkpoint = checkpoints[0]["fine_tuned_model_checkpoint"]
    refused = chat(client, team_key, model=checkpoint)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "adapter_not_approved"
    teams = client.get("/v1/admin/teams", headers=ADMIN).json()["data"]
    team_id = next(t["id"] for t in teams if t["name"] == "alpha")
    patched = client.patch(
        f"/v1/admin/teams/{team_id}", json={"allow_unapproved_chat": True}, headers=ADMIN
    )
    assert patched.status_code == 200 and patched.json()["allow_unapproved_chat"] is True
    pid = httpx.get(f"{inference_url}/health").json()["pid"]
    answer = chat(client, team_key, model=checkpoint, max_tokens=24)
    assert answer.status_code == 200, answer.text
    assert (
        answer.json()["choices"][0]["message"]["content"] == reference(zoo, adapters[1], PROMPT)[0]
    )
    assert httpx.get(f"{inference_url}/health").json()["pid"] == pid  # the same process
    served = {m["id"] for m in httpx.get(f"{inference_url}/v1/models").json()["data"]}
    assert checkpoint in served


def test_a_gated_model_is_refused_and_another_teams_is_not_found(
    app: FastAPI,
    client: TestClient,
    finished: FinishedJob,
    team_key: str,
    make_team: Callable[[str], tuple[str, str]],
) -> None:
    _, other_key = make_team("beta")
    for model in (finished.model_id, f"{finished.model_id}:ckpt-step-{finished.checkpoint_step}"):
        response = chat(client, other_key, model=model)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    with app.state.sessions.begin() as session:
        session.execute(
            update(FineTunedModel)
            .where(FineTunedModel.id == finished.model_id)
            .values(approved=False)
        )
    gated = chat(client, team_key, model=finished.model_id)
    assert gated.status_code == 403
    assert gated.json()["error"]["code"] == "adapter_not_approved"


def test_a_server_that_forgot_the_adapter_gets_it_again(
    client: TestClient, finished: FinishedJob, team_key: str, inference_url: str
) -> None:
    assert chat(client, team_key, model=finished.model_id, max_tokens=4).status_code == 200
    # What a restarted vLLM is like: the adapter is gone from the server.
    gone = httpx.post(
        f"{inference_url}/v1/unload_lora_adapter", json={"lora_name": finished.model_id}
    )
    assert gone.status_code == 200, gone.text
    again = chat(client, team_key, model=finished.model_id, max_tokens=4)
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"messages": []}, 422, None),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, None),
        ({"temperature": 3}, 422, None),
        ({"top_p": 0}, 422, None),
        ({"n": 2}, 422, None),
        ({"max_tokens": 0}, 422, None),
        ({"max_tokens": 100_000}, 400, "context_length_exceeded"),
        ({"model": "no-such-model"}, 404, "model_not_found"),
        ({"model": "ft:tiny:alpha::nope:ckpt-step-x"}, 404, "model_not_found"),
    ],
)
def test_bad_requests_are_4xx_with_codes(
    client: TestClient, team_key: str, tiny_pair: str, body: dict[str, Any], status: int, code: str
) -> None:
    response = chat(client, team_key, **{"model": tiny_pair, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and (code is None or error["code"] == code)


def test_a_server_that_is_down_is_a_503_with_retry_after(
    client: TestClient, team_key: str, tiny_pair: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    moved = client.post(
        "/v1/models",
        json={
            "id": "tiny-elsewhere",
            "aligned_model": "org/tiny-chat",
            "base_model": "org/tiny-base",
            "inference_url": down,
        },
        headers=ADMIN,
    )
    assert moved.status_code == 200, moved.text
    response = chat(client, team_key, model="tiny-elsewhere")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert response.headers["Retry-After"] == "5"
