"""/v1/chat/completions and /v1/models with the fake engine."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.utils.fake_engine import FakeEngine
from tests.utils.records import fetch


def test_chat_uses_template_and_records_messages(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    fake_engine.reply = lambda prompt, adapter, i: "Use sorted()."
    response = client.post(
        "/v1/chat/completions",
        headers=auth["ide"],
        json={
            "model": "fake-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Sort a list?"},
            ],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Use sorted()."}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = fake_engine.requests[-1][0]
    assert prompt.endswith("<|im_start|>user\nSort a list?<|im_end|>\n<|im_start|>assistant\n")
    row = fetch(client, body["id"])
    assert row is not None and row.endpoint == "chat"
    assert row.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort a list?"},
    ]


def test_chat_stream_starts_with_role_and_ends_with_done(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    fake_engine.reply = lambda prompt, adapter, i: "ok"
    response = client.post(
        "/v1/chat/completions",
        headers=auth["ide"],
        json={
            "model": "fake-model",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    blocks = response.text.strip().split("\n\n")
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b[len("data: ") :]) for b in blocks[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == "ok"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_models_lists_base_and_adapters(client: TestClient, auth) -> None:
    response = client.get("/v1/models", headers=auth["ci"])
    assert response.status_code == 200
    ids = [m["id"] for m in response.json()["data"]]
    assert ids == ["fake-model", "test-adapter"]
    assert response.json()["data"][1]["parent"] == "fake-model"
