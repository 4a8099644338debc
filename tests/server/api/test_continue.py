"""Continue's default autocomplete request and its data destination (fake engine).

The payloads are Continue's own, read from continuedev/continue at d0a3c0b:
core/llm/llms/OpenAI.ts (_legacystreamComplete: the body), core/autocomplete/templating/
AutocompleteTemplate.ts (qwenMultifileFimTemplate: the prompt and 9 stops) and getStopTokens.ts
(3 more), core/llm/constants.ts (max_tokens 4096), CompletionProvider.ts (temperature 0.01),
core/data/log.ts (the data event's envelope) and packages/config-yaml/src/schemas/data/
autocomplete (the event's fields, schema 0.2.0).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.utils.fake_engine import FakeEngine

MODEL = "qwen2.5-coder-0.5b-instruct"  # "qwen" and "coder": Continue picks its Qwen template
CONTINUE_STOPS = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|im_start|>",
    "<|im_end|>",
    "/src/",
    "#- coding: utf-8",
    "```",
]
CONTEXT = (
    "<|repo_name|>app\n<|file_sep|>src/ops.py\ndef sub(a, b):\n    return a - b\n"
    "<|file_sep|>src/calc.py\n"
)
PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
PROMPT = f"{CONTEXT}<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
REPLY = "a + b\n\nprint(add(1, 2))\n"  # the model runs on into the suffix


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=2048, reply=lambda *_: REPLY)


def _request(**extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 4096,
        "temperature": 0.01,
        "stop": CONTINUE_STOPS,
        "stream": True,
        **extra,
    }


def _stream(client: TestClient, auth, body: dict[str, object]) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The completion's id and text from a streamed response that ended in [DONE]."""
    with client.stream("POST", "/v1/completions", headers=auth["ide"], json=body) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    return chunks[0]["id"], "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def _record(client: TestClient, auth, cid: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    client.portal.call(client.app.state.recorder.flush)  # type: ignore[attr-defined]
    response = client.get(f"/v1/completions/{cid}", headers=auth["ops"])
    assert response.status_code == 200, response.text
    return response.json()


def test_default_request_is_refused_only_for_max_tokens_without_clamping(
    client: TestClient, auth
) -> None:
    response = client.post("/v1/completions", headers=auth["ide"], json=_request())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens"  # the 12 stop strings are accepted
    assert "at most 1024" in error["message"]


def test_more_than_16_stop_strings_are_refused(client: TestClient, auth) -> None:
    stops = [f"stop{i}" for i in range(17)]
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={"model": MODEL, "prompt": "x", "stop": stops, "max_tokens": 4},
    )
    assert response.status_code == 400
    assert "at most 16 stop sequences" in response.json()["error"]["message"]


def test_clamped_request_is_served_and_its_template_split_for_the_record(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    cid, text = _stream(client, auth, _request(clamp_max_tokens=True))
    prompt, _, params = fake_engine.requests[-1]
    assert prompt == PROMPT  # the model sees exactly what Continue templated
    assert params.max_tokens == 1024  # clamped to the server's limit
    assert text == "a + b"  # the suffix stops apply to a prompt without `suffix`
    record = _record(client, auth, cid)
    assert record["prompt"] == PREFIX
    assert record["suffix"] == SUFFIX
    assert record["params"]["fim_context"] == CONTEXT
    assert record["params"]["max_tokens"] == 1024
    assert record["params"]["requested_max_tokens"] == 4096
    assert len(record["params"]["prompt_sha256"]) == 64


@pytest.fixture
def clamping_client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    clamping = settings.model_copy(update={"clamp_max_tokens": True})
    with TestClient(create_app(clamping, engine=fake_engine)) as test_client:
        yield test_client


def test_server_wide_clamping_serves_continues_request_unchanged(
    clamping_client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    _, text = _stream(clamping_client, auth, _request())
    assert text == "a + b"
    assert fake_engine.requests[-1][2].max_tokens == 1024


def test_a_prompt_that_only_looks_like_fim_is_left_alone(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    odd = "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>c"  # text after the middle marker
    response = client.post(
        "/v1/completions", headers=auth["ide"], json={"model": MODEL, "prompt": odd}
    )
    assert response.status_code == 200
    record = _record(client, auth, response.json()["id"])
    assert record["prompt"] == odd and record["suffix"] is None
    assert "fim_context" not in record["params"]


def _data_event(accepted: bool, prompt: str = PROMPT, **data: object) -> dict[str, object]:
    """One POST of Continue's data destination (core/data/log.ts, schema 0.2.0, level all)."""
    return {
        "name": "autocomplete",
        "data": {
            "eventName": "autocomplete",
            "schema": "0.2.0",
            "timestamp": "2026-12-02T07:00:00.000Z",
            "userId": "",
            "userAgent": "Visual Studio Code/1.99.0 (Continue/1.3.0)",
            "selectedProfileId": "local",
            "disable": False,
            "maxPromptTokens": 1024,
            "debounceDelay": 350,
            "maxSuffixPercentage": 0.2,
            "prefixPercentage": 0.3,
            "multilineCompletions": "auto",
            "slidingWindowPrefixPercentage": 0.75,
            "slidingWindowSize": 500,
            "useCache": True,
            "onlyMyCode": True,
            "useRecentlyEdited": True,
            "useImports": True,
            "accepted": accepted,
            "time": 412,
            "prefix": PREFIX,
            "suffix": SUFFIX,
            "prompt": prompt,
            "completion": "a + b",
            "modelProvider": "openai",
            "modelName": MODEL,
            "cacheHit": False,
            "filepath": "file:///home/alice/src/app/src/calc.py",
            "gitRepo": "Acme/App",
            "completionId": str(uuid.uuid4()),
            "uniqueId": "machine-1",
            **data,
        },
        "schema": "0.2.0",
        "level": "all",
        "profileId": "local",
    }


def _sink(client: TestClient, auth, payload: object, role: str = "ide") -> dict:  # type: ignore[no-untyped-def,type-arg]
    response = client.post("/v1/continue/data", headers=auth[role], json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def test_accepted_event_is_matched_to_the_record_and_writes_the_ledger(
    client: TestClient, auth
) -> None:
    cid, _ = _stream(client, auth, _request(clamp_max_tokens=True))
    answer = _sink(client, auth, _data_event(True))
    assert answer == {"stored": True, "completion_id": cid, "detail": "Stored as accepted."}
    record = _record(client, auth, cid)
    assert [e["type"] for e in record["events"]] == ["accepted"]
    # The request carried no repository; the event's gitRepo and filepath place the record.
    assert record["repository"] == "github.com/acme/app"
    assert record["file_path"] == "src/calc.py"
    [entry] = record["ledger"]
    assert (entry["repository"], entry["file_path"]) == ("github.com/acme/app", "src/calc.py")
    assert entry["inserted_text"] == "a + b"
    ledger = client.get(
        "/v1/ledger", params={"repository": "github.com/acme/app"}, headers=auth["ci"]
    ).json()
    assert [e["completion_id"] for e in ledger["data"]] == [cid]


def test_rejected_event_is_stored_once_even_when_continue_retries(client: TestClient, auth) -> None:
    cid, _ = _stream(client, auth, _request(clamp_max_tokens=True))
    event = _data_event(False)
    assert _sink(client, auth, event)["stored"] is True
    again = _sink(client, auth, event)  # same Continue completionId: same event id
    assert again["completion_id"] == cid
    record = _record(client, auth, cid)
    assert [e["type"] for e in record["events"]] == ["rejected"]
    assert record["ledger"] == []


def test_the_newest_of_two_identical_prompts_is_matched(client: TestClient, auth) -> None:
    _stream(client, auth, _request(clamp_max_tokens=True))
    newer, _ = _stream(client, auth, _request(clamp_max_tokens=True))
    assert _sink(client, auth, _data_event(True))["completion_id"] == newer


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"name": "chatInteraction", "data": {}}, "not used"),
        ("not an event", "Not a Continue data event"),
        (_data_event(True, prompt="something never served"), "No completion served"),
        ({**_data_event(True), "data": {"accepted": True, "modelName": MODEL}}, "level: all"),
    ],
)
def test_events_it_cannot_use_are_answered_200_with_the_reason(
    client: TestClient, auth, payload: object, needle: str
) -> None:
    _stream(client, auth, _request(clamp_max_tokens=True))
    answer = _sink(client, auth, payload)
    assert answer["stored"] is False and needle in answer["detail"]


def test_a_body_that_is_not_json_is_answered_200(client: TestClient, auth) -> None:
    response = client.post("/v1/continue/data", headers=auth["ide"], content=b"{oops")
    assert response.status_code == 200
    assert response.json()["stored"] is False


def test_another_owners_completion_is_never_matched(
    client: TestClient, auth, session_factory
) -> None:  # type: ignore[no-untyped-def]
    from server.store.tokens import Role, create_token

    _stream(client, auth, _request(clamp_max_tokens=True))
    with session_factory() as session:
        bob = create_token(session=session, name="bob", role=Role.IDE)[1]
    answer = _sink(client, {"ide": {"Authorization": f"Bearer {bob}"}}, _data_event(True))
    assert answer["stored"] is False and answer["completion_id"] is None


def test_the_sink_needs_an_ide_token(client: TestClient, auth) -> None:
    assert client.post("/v1/continue/data", json=_data_event(True)).status_code == 401
    assert (
        client.post("/v1/continue/data", headers=auth["ci"], json=_data_event(True)).status_code
        == 403
    )
