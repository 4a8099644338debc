"""Limits: the body limit (413), authentication before the body is parsed, per-token rate and
concurrency limits (429 with Retry-After), and prompts that cannot stall the server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.limits import TokenLimiter, retry_after
from server.app import create_app
from server.config import Settings
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server

COMPLETION = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


def _settings(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _wait(event: threading.Event) -> None:
    assert event.wait(timeout=10), "the request never got there"


@pytest.fixture
def small_body_client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(_settings(settings, max_body_bytes=2048), engine=fake_engine)
    with TestClient(app) as client:
        yield client


# --------------------------------------------------------------------------- body limit


def test_body_over_the_limit_is_413_before_it_is_parsed(
    small_body_client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    payload = {**COMPLETION, "prompt": "y" * 3000}
    error = _error(
        small_body_client.post("/v1/completions", headers=auth["ide"], json=payload), 413
    )
    assert error["code"] == "request_too_large" and "2048 bytes" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake_engine.tokenized == [] and fake_engine.requests == []
    # A body under the limit still gets through.
    assert small_body_client.post(
        "/v1/completions", headers=auth["ide"], json=COMPLETION
    ).is_success
    # Authentication comes first: without a token, the size is nobody's business.
    response = small_body_client.post("/v1/completions", json=payload)
    assert _error(response, 401)["code"] == "missing_token"


def test_chunked_body_over_the_limit_is_413(settings: Settings, auth) -> None:
    """No Content-Length: the guard counts the bytes as they arrive over a real socket."""
    engine = FakeEngine()
    app = create_app(_settings(settings, max_body_bytes=2048), engine=engine)

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    with live_server(app) as server:
        response = httpx.post(
            f"{server.url}/v1/completions",
            content=chunks(),
            headers={**auth["ide"], "Content-Type": "application/json"},
            timeout=30,
        )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert _error(response, 413)["code"] == "request_too_large"
    assert engine.tokenized == []


# ------------------------------------------------------------- authentication first


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer kz_not-a-token"}])
def test_malformed_json_without_a_valid_token_is_401(client: TestClient, headers) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/events", "/v1/outcomes"):
        response = client.post(
            path,
            content=b'{"model": "fake-model", "prompt": ',
            headers={**headers, "Content-Type": "application/json"},
        )
        error = _error(response, 401)
        assert error["code"] in ("missing_token", "invalid_token"), path
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_v1_path_without_a_token_is_401(client: TestClient) -> None:
    # Anonymous clients cannot map the API by probing for 404s.
    assert _error(client.get("/v1/nothing"), 401)["code"] == "missing_token"


# ---------------------------------------------------------------- per-token limits


def test_rate_limit_is_per_token_with_retry_after(settings: Settings, auth) -> None:
    app = create_app(
        _settings(settings, rate_limit_per_minute=1, rate_limit_burst=2), engine=FakeEngine()
    )
    with TestClient(app) as client:
        for _ in range(2):
            assert client.post("/v1/completions", headers=auth["ide"], json=COMPLETION).is_success
        refused = client.post("/v1/completions", headers=auth["ide"], json=COMPLETION)
        error = _error(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "KAIZEN_RATE_LIMIT_PER_MINUTE" in error["message"]
        # One request per minute: the next one is most of a minute away.
        assert 30 <= int(refused.headers["retry-after"]) <= 60
        # Another token has its own bucket.
        assert client.post("/v1/completions", headers=auth["ops"], json=COMPLETION).is_success
        # Refused requests left no record.
        client.portal.call(client.app.state.recorder.flush)
        assert client.app.state.recorder.written == 3
    # 0 turns the limits off.
    off = _settings(
        settings, rate_limit_per_minute=0, rate_limit_burst=1, max_concurrent_per_token=0
    )
    with TestClient(create_app(off, engine=FakeEngine())) as client:
        for _ in range(20):
            assert client.get("/v1/models", headers=auth["ide"]).is_success
        assert client.app.state.limiter.rate == 0


def test_concurrency_limit_counts_a_stream_until_it_ends(settings: Settings, auth) -> None:
    engine = FakeEngine()
    engine.hold_generate = threading.Event()
    app = create_app(_settings(settings, max_concurrent_per_token=1), engine=engine)
    with TestClient(app) as client:
        results: dict[str, httpx.Response] = {}

        def stream() -> None:
            results["stream"] = client.post(
                "/v1/completions", headers=auth["ide"], json={**COMPLETION, "stream": True}
            )

        first = threading.Thread(target=stream)
        first.start()
        try:
            _wait(engine.generating)
            refused = client.post("/v1/completions", headers=auth["ide"], json=COMPLETION)
            error = _error(refused, 429)
            assert error["code"] == "too_many_concurrent_requests"
            assert refused.headers["retry-after"] == "1"
            # Another token is not affected by this one's stream.
            assert client.get("/v1/models", headers=auth["ci"]).is_success
        finally:
            engine.hold_generate.set()
            first.join(timeout=30)
        assert results["stream"].status_code == 200
        assert results["stream"].text.endswith("data: [DONE]\n\n")
        # The stream ended, so its slot is free again.
        assert client.post("/v1/completions", headers=auth["ide"], json=COMPLETION).is_success
        assert client.app.state.limiter.in_flight(1) == 0


def test_default_limits_admit_the_benchmarks_load(settings: Settings) -> None:
    """benchmarks/serving.py and loop.py run 8 concurrent streams with one token, hotswap.py 4
    per replica, tests/utils/traffic.py 20, and test_live_traffic sends 200 requests at once."""
    defaults = Settings(_env_file=None, home=settings.home)  # type: ignore[call-arg]
    assert defaults.max_concurrent_per_token >= 20
    assert defaults.rate_limit_burst >= 200
    assert defaults.rate_limit_per_minute / 60 >= 25  # requests per second, sustained


def test_token_limiter_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = TokenLimiter(per_minute=60, burst=3, max_in_flight=0, clock=lambda: now[0])
    assert [limiter.take(7) for _ in range(3)] == [None, None, None]
    wait = limiter.take(7)
    assert wait == pytest.approx(1.0) and retry_after(wait) == "1"
    now[0] += 0.5
    assert limiter.take(7) == pytest.approx(0.5)  # half a request refilled, half to go
    now[0] += 0.5
    assert limiter.take(7) is None
    now[0] += 1000
    assert [limiter.take(7) for _ in range(4)][-1] is not None  # refills only up to the burst
    assert limiter.take(8) is None  # another token


def test_token_limiter_counts_in_flight_per_token() -> None:
    limiter = TokenLimiter(per_minute=0, burst=1, max_in_flight=2)
    assert limiter.enter(1) and limiter.enter(1)
    assert not limiter.enter(1) and limiter.enter(2)
    limiter.leave(1)
    assert limiter.in_flight(1) == 1 and limiter.enter(1)
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


# ------------------------------------------------------------------- prompt size


def test_prompt_over_the_character_bound_is_refused_before_tokenising(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    # The fake's context is 256 tokens; the default bound is 16 characters per token.
    payload = {**COMPLETION, "prompt": "y" * (256 * 16 + 1)}
    error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "4096 characters" in error["message"]
    fim = {**COMPLETION, "prompt": "y" * 4000, "suffix": "z" * 200}
    assert _error(client.post("/v1/completions", headers=auth["ide"], json=fim), 400)["code"] == (
        "context_length_exceeded"
    )
    chat = {
        "model": "fake-model",
        "messages": [
            {"role": "user", "content": "y" * 3000},
            {"role": "user", "content": "y" * 3000},
        ],
    }
    error = _error(client.post("/v1/chat/completions", headers=auth["ide"], json=chat), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert fake_engine.tokenized == []
    # Under the character bound, the token bound still applies after tokenising.
    long = {**COMPLETION, "prompt": "y" * 300}
    error = _error(client.post("/v1/completions", headers=auth["ide"], json=long), 400)
    assert error["code"] == "context_length_exceeded" and fake_engine.tokenized == [300]


def test_character_bound_is_configurable(settings: Settings, auth) -> None:
    engine = FakeEngine()
    app = create_app(_settings(settings, prompt_chars_per_token=1.0), engine=engine)
    with TestClient(app) as client:
        payload = {**COMPLETION, "prompt": "y" * 257}
        error = _error(client.post("/v1/completions", headers=auth["ide"], json=payload), 400)
    assert "at most 256 characters" in error["message"] and engine.tokenized == []


def test_tokenising_does_not_block_the_event_loop(settings: Settings, auth) -> None:
    """While one prompt is being tokenised, the server still answers /healthz and completes
    other requests: tokenisation runs in a worker thread, not on the event loop."""
    engine = FakeEngine()
    engine.hold_tokenize = threading.Event()
    with live_server(create_app(settings, engine=engine)) as server:
        results: dict[str, httpx.Response] = {}

        def slow() -> None:
            results["slow"] = httpx.post(
                f"{server.url}/v1/completions", headers=auth["ide"], json=COMPLETION, timeout=60
            )

        thread = threading.Thread(target=slow)
        thread.start()
        try:
            _wait(engine.tokenizing)
            health = httpx.get(f"{server.url}/healthz", timeout=5)
            models = httpx.get(f"{server.url}/v1/models", headers=auth["ops"], timeout=5)
        finally:
            engine.hold_tokenize.set()
            thread.join(timeout=60)
    assert health.status_code == 200 and models.status_code == 200
    assert results["slow"].status_code == 200
