"""200 mixed requests against a real uvicorn server, some clients hanging up mid-stream:
afterwards the database holds exactly one row per request, with the right status."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from sqlalchemy import select

from server.app import create_app
from server.config import Settings
from server.store.models import Completion
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server


async def _plain(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
    r = await client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": f"p{i}", "max_tokens": 8}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _fim(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
    r = await client.post(
        "/v1/completions",
        json={
            "model": "test-adapter",
            "prompt": f"def f{i}():\n    ",
            "suffix": "\n    return x\n",
            "max_tokens": 30,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _chat(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 8,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _stream(client: httpx.AsyncClient, i: int, hang_up: bool) -> tuple[str, str]:
    # A hung-up stream is long (200 tokens, ~1 s) so it cannot finish before the client leaves.
    max_tokens = 200 if hang_up else 20
    body = {"model": "fake-model", "prompt": f"s{i}", "max_tokens": max_tokens, "stream": True}
    completion_id = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                completion_id = json.loads(line[6:])["id"]
                if hang_up:
                    break  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                break
    return completion_id, "aborted" if hang_up else "completed"


def test_every_request_leaves_exactly_one_row(settings: Settings, auth, session_factory) -> None:
    engine = FakeEngine(token_delay=0.005, reply=lambda prompt, adapter, i: "x = 1\n" * 100)
    rng = random.Random(7)
    kinds = rng.choices(["plain", "fim", "chat", "stream", "hangup"], k=200)

    async def run(url: str) -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(
            base_url=url, headers=auth["ide"], limits=limits, timeout=30
        ) as client:
            sem = asyncio.Semaphore(20)

            async def one(i: int, kind: str) -> tuple[str, str]:
                async with sem:
                    if kind in ("stream", "hangup"):
                        return await _stream(client, i, hang_up=kind == "hangup")
                    return await {"plain": _plain, "fim": _fim, "chat": _chat}[kind](client, i)

            return await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))

    with live_server(create_app(settings, engine=engine)) as server:
        expected = asyncio.run(run(server.url))
    # The server has shut down gracefully: its recorder has drained.
    with session_factory() as session:
        rows = {row.id: row.status for row in session.scalars(select(Completion))}
    assert len(rows) == 200
    assert rows == dict(expected)
    assert sum(1 for status in rows.values() if status == "aborted") == kinds.count("hangup") > 0
    assert len(engine.aborted) == kinds.count("hangup")


def test_non_streaming_client_that_hangs_up_aborts_the_generation(
    settings: Settings, auth, session_factory
) -> None:
    engine = FakeEngine(token_delay=0.05)
    with live_server(create_app(settings, engine=engine)) as server:
        try:
            httpx.post(f"{server.url}/v1/completions", headers=auth["ide"], timeout=0.3,
                       json={"model": "fake-model", "prompt": "x", "max_tokens": 40})
            raise AssertionError("the request should have timed out")
        except httpx.ReadTimeout:
            pass
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(engine.aborted) == 1
    with session_factory() as session:
        (row,) = session.scalars(select(Completion)).all()
    assert row.status == "aborted" and 0 < row.completion_tokens < 40
