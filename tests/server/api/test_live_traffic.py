"""200 mixed requests against a real uvicorn server, some clients hanging up mid-stream:
afterwards the database holds exactly one row per request, with the right status."""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlalchemy import select

from server.app import create_app
from server.config import Settings
from server.store.models import Completion
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server
from tests.utils.traffic import random_kinds, run_traffic


def test_every_request_leaves_exactly_one_row(settings: Settings, auth, session_factory) -> None:
    engine = FakeEngine(token_delay=0.005, reply=lambda prompt, adapter, i: "x = 1\n" * 100)
    kinds = random_kinds(200)
    with live_server(create_app(settings, engine=engine)) as server:
        expected = asyncio.run(
            run_traffic(server.url, auth["ide"], kinds, model="fake-model", adapter="test-adapter")
        )
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
            httpx.post(
                f"{server.url}/v1/completions",
                headers=auth["ide"],
                timeout=0.3,
                json={"model": "fake-model", "prompt": "x", "max_tokens": 40},
            )
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
