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


@pytest.mark.parametrize("temperature", [0, 0.000001])
def test_several_greedy_choices_are_400(client: TestClient, auth, temperature: float) -> None:
    payload = {"model": "fake-model", "prompt": "x", "n": 8, "temperature": temperature}
    error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
    assert error["param"] == "n" and "temperature above 0" in error["message"]
    chat = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "temperature": temperature,
    }
    assert _error(client.post("/v1/chat/completions", headers=auth["ide"], json=chat), 400)[
        "param"
    ] == ("n")
    single = {**payload, "n": 1}
    assert client.post("/v1/completions", headers=auth["ide"], json=single).status_code == 200


def test_seed_outside_64_bits_is_400(client: TestClient, auth, fake_engine: FakeEngine) -> None:
    for seed in (2**64, 2**70, -(2**63) - 1):
        payload = {"model": "fake-model", "prompt": "x", "seed": seed}
        error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
        assert error["param"] == "seed" and "Input should be" in error["message"]
    for seed in (2**64 - 1, -(2**63), -1, 0):  # the bounds themselves are vLLM's to take
        payload = {"model": "fake-model", "prompt": "x", "seed": seed, "max_tokens": 2}
        assert client.post("/v1/completions", headers=auth["ide"], json=payload).status_code == 200
        assert fake_engine.requests[-1][2].seed == seed


# Raw JSON: json.dumps would refuse nothing, but the escapes must reach the server as written.
_LONE = r"a\ud800b"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", f'{{"model": "fake-model", "prompt": "{_LONE}"}}', "prompt"),
        ("/v1/completions", f'{{"model": "fake-model", "prompt": ["{_LONE}"]}}', "prompt.0"),
        (
            "/v1/completions",
            f'{{"model": "fake-model", "prompt": "x", "suffix": "{_LONE}"}}',
            "suffix",
        ),
        ("/v1/completions", f'{{"model": "fake-model", "prompt": "x", "stop": "{_LONE}"}}', "stop"),
        (
            "/v1/completions",
            f'{{"model": "fake-model", "prompt": "x", "stop": ["ok", "{_LONE}"]}}',
            "stop.1",
        ),
        ("/v1/completions", r'{"model": "fake-\udfff", "prompt": "x"}', "model"),
        (
            "/v1/chat/completions",
            f'{{"model": "fake-model", "messages": [{{"role": "user", "content": "{_LONE}"}}]}}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "messages": [{"role": "user", "content": '
            f'[{{"type": "text", "text": "{_LONE}"}}]}}]}}',
            "messages.0.content.0.text",
        ),
        (
            "/v1/events",
            f'{{"events": [{{"id": "e1234567", "completion_id": "c", "kind": "{_LONE}"}}]}}',
            "events.0.kind",
        ),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(
    client: TestClient, auth, fake_engine: FakeEngine, path: str, body: str, param: str
) -> None:
    response = client.post(
        path, content=body.encode(), headers={**auth["ops"], "Content-Type": "application/json"}
    )
    error = _error(response, 400)
    assert error["param"] == param and error["code"] == "invalid_unicode"
    assert f"'{param}'" in error["message"] and "surrogate" in error["message"]
    assert fake_engine.requests == []


def test_lone_surrogate_in_a_key_is_400_but_valid_escapes_are_text(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    body = r'{"model": "fake-model", "prompt": "x", "context": {"\ud800": 1}}'
    response = client.post(
        "/v1/completions",
        content=body.encode(),
        headers={**auth["ide"], "Content-Type": "application/json"},
    )
    assert _error(response, 400)["param"] == "context"
    # A surrogate pair is one character; an escaped backslash before "ud800" is plain text.
    body = r'{"model": "fake-model", "prompt": "smile \ud83d\ude00, a literal \\ud800"}'
    response = client.post(
        "/v1/completions",
        content=body.encode(),
        headers={**auth["ide"], "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert fake_engine.requests[-1][0] == "smile \U0001f600, a literal \\ud800"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "fake-model", "prompt": "x", "stop": ["ok", 1]}, "stop.1"),
        ({"model": "fake-model", "prompt": "x", "stop": 5}, "stop"),
        ({"model": "fake-model", "prompt": ["x", 2]}, "prompt.1"),
    ],
)
def test_validation_errors_name_the_parameter_as_sent(
    client: TestClient, auth, payload, param: str
) -> None:
    error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
    assert error["param"] == param, error


@pytest.mark.parametrize("field", ["canary_share", "auto_rollout", "training_paused"])
def test_null_rollout_setting_is_400_not_500(client: TestClient, auth, field: str) -> None:
    # Found by the schemathesis run (tests/server/api/test_openapi.py): a NOT NULL column got None.
    response = client.put("/v1/rollout", headers=auth["ops"], json={field: None})
    error = _error(response, 400)
    assert error["param"] == field and "cannot be null" in error["message"]
    assert client.put("/v1/rollout", headers=auth["ops"], json={"pinned": None}).status_code == 200
