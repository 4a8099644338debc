"""Bad input gets a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from tests.utils.fake_engine import FakeEngine


def _error(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param", "needle"),
    [
        ({"model": "fake-model", "prompt": ""}, "prompt", "empty"),
        ({"model": "fake-model", "prompt": ["a", "b"]}, "prompt", "one prompt"),
        ({"model": "fake-model", "prompt": "x", "max_tokens": 5000}, "max_tokens", "at most"),
        ({"model": "fake-model", "prompt": "x", "max_tokens": 0}, "max_tokens", "greater"),
        ({"model": "fake-model", "prompt": "x", "temperature": 3}, "temperature", "less"),
        ({"model": "fake-model", "prompt": "x", "n": 99}, "n", "at most"),
        ({"model": "fake-model", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ({"model": "fake-model", "prompt": "x", "echo": True}, "echo", "not supported"),
        ({"model": "fake-model"}, "prompt", "Field required"),
        ({"prompt": "x"}, "model", "Field required"),
        ({"model": "fake-model", "prompt": "y" * 300}, "prompt", "context"),
        ({"model": "fake-model", "prompt": "y" * 200, "max_tokens": 100}, "max_tokens", "context"),
    ],
)
def test_bad_completion_requests_are_400(client: TestClient, auth, payload, param, needle) -> None:
    error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert needle in error["message"]


def test_unknown_model_is_404(client: TestClient, auth) -> None:
    error = _error(
        client.post("/v1/completions", headers=auth["ide"], json={"model": "gpt-9", "prompt": "x"}),
        404,
    )
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]


def test_malformed_json_is_400(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/completions",
        content=b'{"model": "fake-model", "prompt": ',
        headers={**auth["ide"], "Content-Type": "application/json"},
    )
    assert "Malformed JSON" in _error(response, 400)["message"]


def test_empty_chat_messages_is_400(client: TestClient, auth) -> None:
    error = _error(
        client.post(
            "/v1/chat/completions",
            headers=auth["ide"],
            json={"model": "fake-model", "messages": []},
        ),
        400,
    )
    assert error["param"] == "messages"


def test_suffix_on_model_without_fim_tokens_is_400(settings: Settings, auth) -> None:
    engine = FakeEngine()
    engine.special_token_id = lambda token: None  # type: ignore[method-assign]
    from server.app import create_app

    with TestClient(create_app(settings, engine=engine)) as client:
        error = _error(
            client.post(
                "/v1/completions",
                headers=auth["ide"],
                json={"model": "fake-model", "prompt": "a", "suffix": "b"},
            ),
            400,
        )
    assert error["param"] == "suffix"


def test_engine_not_ready_is_503(settings: Settings, auth) -> None:
    from server.app import create_app

    with TestClient(create_app(settings, engine=FakeEngine(ready=False))) as client:
        assert client.get("/readyz").status_code == 503
        error = _error(
            client.post(
                "/v1/completions", headers=auth["ide"], json={"model": "fake-model", "prompt": "x"}
            ),
            503,
        )
    assert error["code"] == "engine_not_ready"


def test_unknown_route_is_404_in_error_shape(client: TestClient, auth) -> None:
    _error(client.get("/v1/nothing", headers=auth["ide"]), 404)
