"""The benchmarks' shared streaming client and model resolver: real SSE bytes, cut across
chunks at awkward places, through an httpx transport and from the real app under uvicorn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.common import Model, StreamResult, resolve_model, sse_data, stream_completion
from server.app import create_app
from server.config import Settings
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import RunningServer, live_server

BODY = {"model": "m", "prompt": "def f():\n    ", "max_tokens": 8, "stream": True}


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _chunk(text: str, finish_reason: str | None = None) -> bytes:
    return _event(
        {"id": "cmpl-1", "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}
    )


USAGE = _event(
    {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
)
DONE = b"data: [DONE]\n\n"


def _split(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


async def _body(pieces: Sequence[bytes | float | BaseException]) -> AsyncIterator[bytes]:
    """The response body: bytes as they are, a float sleeps that long, an exception is raised."""
    for piece in pieces:
        if isinstance(piece, float):
            await asyncio.sleep(piece)
        elif isinstance(piece, BaseException):
            raise piece
        else:
            yield piece


def _client(
    pieces: Sequence[bytes | float | BaseException],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    seen: list[httpx.Request] | None = None,
) -> httpx.AsyncClient:
    async def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(
            status,
            headers={"content-type": "text/event-stream", **(headers or {})},
            content=_body(pieces),
        )

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://bench")


async def _stream(client: httpx.AsyncClient, **kwargs: Any) -> StreamResult:
    async with client:
        return await stream_completion(client, "/v1/completions", BODY, **kwargs)


# ------------------------------------------------------------------------------ SSE parsing


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _events(*lines: str) -> list[str]:
    return [data async for data in sse_data(_lines(*lines))]


async def test_sse_data_joins_data_lines_and_skips_comments_and_other_fields() -> None:
    events = await _events(
        ": keep-alive", "", "event: message", "id: 7", "data: a", "data:b", "", "", "data: [DONE]"
    )
    assert events == ["a\nb", "[DONE]"]  # the last one is cut off by the end, and still given


# ------------------------------------------------------------------------------ the client


async def test_a_stream_split_across_chunks_is_read_whole_with_its_timings() -> None:
    role = _chunk("")  # an event without text does not count as the first token
    x, one = _chunk("x = "), _chunk("1\n", "stop")
    pieces: list[bytes | float | BaseException] = [
        *_split(role, 3),  # cut inside "data:"
        0.05,
        *_split(x, 20, len(x) - 1),  # inside the JSON, then between the two newlines
        x[-1:] + one[:-3],
        one[-3:] + USAGE,
        DONE[:9],  # inside [DONE], with a wait
        0.05,
        DONE[9:],
    ]
    seen: list[httpx.Request] = []
    client = _client(
        pieces,
        headers={"X-Kaizen-Adapter": "kaizen-r1", "X-Kaizen-Other": "y", "X-Other": "no"},
        seen=seen,
    )
    result = await _stream(client, headers={"Authorization": "Bearer kz_test"})

    assert result.ok and result.failure is None and result.error is None
    assert result.status == 200 and result.done
    assert result.text == "x = 1\n"
    assert result.response_id == "cmpl-1"
    assert (result.prompt_tokens, result.completion_tokens) == (5, 3)
    assert result.finish_reason == "stop"
    assert result.headers == {"x-kaizen-adapter": "kaizen-r1", "x-kaizen-other": "y"}
    assert result.ttft_s is not None and 0.05 <= result.ttft_s < result.total_s
    assert result.total_s >= result.ttft_s + 0.05  # the wait before [DONE] counts
    assert json.loads(seen[0].content) == BODY
    assert seen[0].headers["authorization"] == "Bearer kz_test"


async def test_crlf_line_ends_are_read_like_newlines() -> None:
    body = (_chunk("a") + USAGE + DONE).replace(b"\n", b"\r\n")
    result = await _stream(_client(_split(body, 7, body.index(b"\r") + 1)))  # cut in a CRLF
    assert result.ok and result.text == "a" and result.completion_tokens == 3


async def test_an_error_event_fails_the_stream_even_with_done() -> None:
    error = {"error": {"message": "Generation failed: boom", "code": "generation_failed"}}
    result = await _stream(_client([_chunk("x"), *_split(_event(error), 9), DONE]))
    assert not result.ok and result.failure == "event" and result.done
    assert result.error is not None and "generation_failed" in result.error
    assert result.text == "x" and result.status == 200


async def test_a_stream_without_done_is_incomplete() -> None:
    result = await _stream(_client([_chunk("x"), USAGE]))
    assert not result.ok and result.failure == "incomplete" and not result.done
    assert result.text == "x" and result.completion_tokens == 3


async def test_another_status_is_an_http_failure_with_the_body() -> None:
    body = b'{"error": {"message": "the engine is loading", "code": "engine_not_ready"}}'
    result = await _stream(_client([body], status=503))
    assert not result.ok and result.failure == "http" and result.status == 503
    assert result.error is not None and result.error.startswith("HTTP 503: ")
    assert "engine_not_ready" in result.error


async def test_a_connection_cut_mid_stream_is_a_transport_failure_after_200() -> None:
    cut = httpx.ReadError("connection reset by peer")
    result = await _stream(_client([_chunk("x = "), cut]))
    assert not result.ok and result.failure == "transport" and result.status == 200
    assert result.error is not None and "ReadError" in result.error
    assert result.text == "x = " and result.ttft_s is not None


async def test_no_answer_is_a_transport_failure_without_a_status() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://bench")
    result = await _stream(client)
    assert not result.ok and result.failure == "transport" and result.status is None
    assert result.ttft_s is None and result.text == ""


@pytest.mark.parametrize("event", [b"data: {not json\n\n", b"data: [1, 2]\n\n"])
async def test_an_event_that_is_not_a_json_object_is_a_transport_failure(event: bytes) -> None:
    result = await _stream(_client([_chunk("x"), event, DONE]))
    assert not result.ok and result.failure == "transport" and result.status == 200


# ------------------------------------------------------------------------------ the real app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(token_delay=0.01)


@pytest.fixture
def server(settings: Settings, engine: FakeEngine) -> Iterator[RunningServer]:
    with live_server(create_app(settings, engine=engine)) as running:
        yield running


def _kaizen_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "prompt": "x",
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _against(server: RunningServer, token: str, body: dict[str, Any]) -> StreamResult:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as client:
        return await stream_completion(
            client, "/v1/completions", body, {"Authorization": f"Bearer {token}"}
        )


async def test_the_real_server_stream_is_read_with_its_adapter_header(
    server: RunningServer, tokens: dict[str, str]
) -> None:
    result = await _against(server, tokens["ide"], _kaizen_body(4))
    assert result.ok, result.error
    assert result.text == "x = " and result.completion_tokens == 4
    assert result.finish_reason == "length"
    assert result.headers.get("x-kaizen-adapter") == "base"
    assert result.response_id and result.ttft_s is not None and result.ttft_s < result.total_s


async def test_the_real_server_error_event_and_refusal(
    server: RunningServer, tokens: dict[str, str], engine: FakeEngine
) -> None:
    refused = await _against(server, "kz_not_a_token", _kaizen_body(4))
    assert refused.failure == "http" and refused.status == 401
    engine.fail_after = 2
    failed = await _against(server, tokens["ide"], _kaizen_body(10))
    assert failed.failure == "event" and failed.done and failed.text == "x "
    assert failed.error is not None and "generation_failed" in failed.error


# ------------------------------------------------------------------------------ models


def _checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_model_directory_is_served_under_its_name(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "my-model")
    assert resolve_model(str(model)) == Model(model.resolve(), "my-model")


def test_a_directory_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no config.json"):
        resolve_model(str(tmp_path))


def test_no_spec_reads_kaizen_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _checkpoint(tmp_path / "from-env")
    monkeypatch.setenv("KAIZEN_MODEL", str(model))
    assert resolve_model() == Model(model.resolve(), "from-env")


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Stands in for preparing the bundled model (a download); records the cache it got."""
    import server.model_prep

    caches: list[Path] = []

    def prepare(cache_dir: Path, **_: Any) -> Path:
        caches.append(Path(cache_dir))
        return Path(cache_dir) / server.model_prep.BUNDLED_MODEL_NAME

    monkeypatch.setattr(server.model_prep, "prepare_bundled_model", prepare)
    for name in ("KAIZEN_MODEL", "KAIZEN_MODEL_CACHE", "KAIZEN_HOME"):
        monkeypatch.delenv(name, raising=False)
    return caches


def test_bundled_is_prepared_in_the_cache_given_else_where_the_server_keeps_it(
    prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.model_prep import BUNDLED_MODEL_NAME

    given = resolve_model("bundled", model_cache=tmp_path / "given")
    assert given == Model(tmp_path / "given" / BUNDLED_MODEL_NAME, BUNDLED_MODEL_NAME)
    monkeypatch.setenv("KAIZEN_HOME", str(tmp_path / "home"))
    assert resolve_model().path == tmp_path / "home" / "models" / BUNDLED_MODEL_NAME
    monkeypatch.setenv("KAIZEN_MODEL_CACHE", str(tmp_path / "cache"))
    assert resolve_model("bundled").path == tmp_path / "cache" / BUNDLED_MODEL_NAME
    assert prepared == [tmp_path / "given", tmp_path / "home" / "models", tmp_path / "cache"]


def test_tiny_is_built_in_the_scratch_directory_else_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import tests.utils.tiny_model

    built: list[Path] = []

    def build(path: Path) -> Path:
        built.append(path)
        return _checkpoint(path)

    monkeypatch.setattr(tests.utils.tiny_model, "build_tiny_model", build)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert resolve_model("tiny", scratch=tmp_path) == Model(tmp_path / "tiny-model", "tiny")
    elsewhere = resolve_model("tiny")
    assert elsewhere.served_name == "tiny" and elsewhere.path.name == "tiny-model"
    assert elsewhere.path.parent.parent == tmp_path / "tmp"
    assert built == [tmp_path / "tiny-model", elsewhere.path]
