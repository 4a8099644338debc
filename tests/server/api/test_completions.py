"""/v1/completions through the HTTP layer with the fake engine: shapes, FIM, SSE, recording."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.utils.fake_engine import FakeEngine
from tests.utils.records import fetch


def _sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n")
    return [block[len("data: ") :] for block in text.strip().split("\n\n")]


def test_plain_completion_returns_text_and_records_it(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={
            "model": "fake-model",
            "prompt": "def f():\n    ",
            "max_tokens": 5,
            "context": {"language": "python", "file_path": "src/f.py", "repository": "acme/app"},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "x = 0", "finish_reason": "length", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}

    row = fetch(client, body["id"])
    assert row is not None
    assert (row.status, row.endpoint, row.adapter, row.stream) == (
        "completed",
        "completions",
        None,
        False,
    )
    assert row.prompt == "def f():\n    " and row.suffix is None
    assert (row.language, row.file_path, row.repository) == ("python", "src/f.py", "acme/app")
    assert row.params["max_tokens"] == 5 and row.prompt_tokens == 13
    assert row.completion_tokens == 5 and row.ttft_ms is not None and row.latency_ms > 0
    assert [(c.index, c.text, c.finish_reason) for c in row.choices] == [(0, "x = 0", "length")]


def test_fim_prompt_is_built_in_model_format_and_cut_at_suffix(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    # The model writes the middle, then starts repeating the suffix's first line.
    fake_engine.reply = lambda prompt, adapter, i: "y = a + b\n    return y\n\nprint(1)"
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={
            "model": "fake-model",
            "prompt": "def add(a, b):\n    ",
            "suffix": "\n    return y\n",
            "max_tokens": 40,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "y = a + b"
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    prompt, _, params = fake_engine.requests[-1]
    assert prompt == (
        "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>"
    )
    assert "\n    return y" in params.stop
    row = fetch(client, response.json()["id"])
    assert row is not None and row.suffix == "\n    return y\n"
    assert row.prompt == "def add(a, b):\n    "


def test_single_line_mode_stops_at_newline(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": "fake-model", "prompt": "x", "max_tokens": 50, "single_line": True},
    )
    assert response.json()["choices"][0]["text"] == "x = 0  # base"


def test_named_adapter_is_used_and_recorded(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": "test-adapter", "prompt": "x", "max_tokens": 50, "stop": ["\n"]},
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "x = 0  # test-adapter"
    assert response.json()["model"] == "test-adapter"
    assert fake_engine.requests[-1][1] == "test-adapter"
    row = fetch(client, response.json()["id"])
    assert row is not None and row.adapter == "test-adapter"


def test_n_choices_are_returned_and_recorded(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": "fake-model", "prompt": "x", "max_tokens": 50, "n": 3, "stop": "\n"},
    )
    texts = [c["text"] for c in response.json()["choices"]]
    assert texts == ["x = 0  # base", "x = 1  # base", "x = 2  # base"]
    row = fetch(client, response.json()["id"])
    assert row is not None and [c.text for c in row.choices] == texts


def test_streaming_sends_chunks_then_done_and_records(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={
            "model": "fake-model",
            "prompt": "x",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "x = "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1
    row = fetch(client, chunks[0]["id"])
    assert row is not None and row.stream and row.status == "completed"
    assert row.choices[0].text == "x = "


def test_engine_failure_mid_stream_ends_with_error_event_and_failed_record(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_after = 2
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": "fake-model", "prompt": "x", "max_tokens": 10, "stream": True},
    )
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "generation_failed"
    completion_id = json.loads(events[0])["id"]
    row = fetch(client, completion_id)
    assert row is not None and row.status == "failed" and "scripted" in (row.error or "")
    assert row.choices[0].text == "x "


def test_engine_failure_without_stream_is_500_and_recorded(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    fake_engine.fail_after = 1
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": "fake-model", "prompt": "x", "max_tokens": 10},
    )
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "generation_failed"
    client.portal.call(client.app.state.recorder.flush)
    with client.app.state.session_factory() as session:
        from sqlalchemy import select

        from server.store.models import Completion

        rows = session.scalars(select(Completion)).all()
    assert [r.status for r in rows] == ["failed"]


def test_a_python_body_stops_before_the_model_invents_the_next_function(
    client: TestClient, auth, fake_engine
) -> None:
    """Seen on real projects: the model writes the body, then a new top-level ``def`` unlike the
    suffix's, runs to max_tokens and leaves a half-written function that breaks the module."""
    fake_engine.reply = lambda prompt, adapter, i: (
        "return x + 1\n\n\ndef expand_sig_with_keywords(sig, kw"
    )
    request = {
        "model": "fake-model",
        "prompt": "def inc(x):\n    ",
        "suffix": "\n\ndef expand_sig(sig):\n    return sig\n",
        "max_tokens": 40,
    }
    python = {**request, "context": {"language": "python", "file_path": "m.py"}}
    response = client.post("/v1/completions", headers=auth["ide"], json=python)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == "return x + 1\n\n" and choice["finish_reason"] == "stop"
    # Without a language there is no block rule: the suffix stops alone miss this one.
    response = client.post("/v1/completions", headers=auth["ide"], json=request)
    assert "def expand_sig_with" in response.json()["choices"][0]["text"]
