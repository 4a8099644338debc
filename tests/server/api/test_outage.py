"""A database outage, as the API sees it: recently verified tokens keep completing (their
records journaled, then written once the database is back), unknown tokens and feedback get 503
with Retry-After (never a 500, a 401 or a hang), /readyz says what is down, and no response is
sent before its record is durable."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from server.app import create_app
from server.config import Settings
from server.store.completions import count_completions
from server.store.journal import Journal
from server.store.tokens import revoke_token
from tests.utils.fake_engine import FakeEngine
from tests.utils.records import flush


class Outage:
    """Every statement on every SQLAlchemy engine fails the way an unreachable database
    fails (an OperationalError), until ``end()``."""

    def __init__(self) -> None:
        self.down = False

    def start(self) -> None:
        self.down = True

    def end(self) -> None:
        self.down = False

    def refuse(self, *_: Any) -> None:
        if self.down:
            raise sqlite3.OperationalError("unable to open database file (test outage)")


@pytest.fixture
def outage() -> Iterator[Outage]:
    state = Outage()
    event.listen(Engine, "before_cursor_execute", state.refuse)
    yield state
    event.remove(Engine, "before_cursor_execute", state.refuse)


@pytest.fixture
def outage_client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    settings = settings.model_copy(update={"auth_cache_seconds": 0, "recorder_drain_seconds": 1})
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        # Retry quickly so the test sees the recovery soon after the outage ends.
        client.app.state.recorder._retry_delay = 0.05  # type: ignore[attr-defined]
        yield client


def _complete(client: TestClient, headers: dict[str, str], **extra: Any) -> httpx.Response:
    return client.post(
        "/v1/completions",
        headers=headers,
        json={"model": "fake-model", "prompt": "def f():", "max_tokens": 4, **extra},
    )


def _stored(client: TestClient) -> int:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return count_completions(session=session)


def test_recent_tokens_keep_completing_and_records_arrive_once_after(
    outage_client: TestClient, auth: dict[str, dict[str, str]], outage: Outage
) -> None:
    client = outage_client
    assert _complete(client, auth["ide"]).status_code == 200  # verified while the database is up
    flush(client)
    outage.start()
    during = [_complete(client, auth["ide"], stream=i % 2 == 1) for i in range(4)]
    assert [r.status_code for r in during] == [200] * 4
    recorder = client.app.state.recorder  # type: ignore[attr-defined]
    assert recorder.database_available is False
    assert recorder.status()["journaled_records"] == 4
    outage.end()
    flush(client)
    assert _stored(client) == 5
    assert recorder.duplicates == 0 and recorder.status()["journaled_records"] == 0


def test_unknown_tokens_get_503_with_retry_after(
    outage_client: TestClient, auth: dict[str, dict[str, str]], outage: Outage
) -> None:
    outage.start()
    response = _complete(outage_client, auth["ide"])  # never verified by this replica
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "database_unavailable"


def test_a_token_seen_revoked_stays_refused_during_an_outage(
    outage_client: TestClient,
    auth: dict[str, dict[str, str]],
    outage: Outage,
    session_factory: Any,
) -> None:
    assert _complete(outage_client, auth["ide"]).status_code == 200
    with session_factory() as session:
        from server.store.models import ApiToken

        token = session.query(ApiToken).filter_by(name="test-ide").one()
        revoke_token(session=session, token_id=token.id)
    assert _complete(outage_client, auth["ide"]).status_code == 401
    outage.start()
    assert _complete(outage_client, auth["ide"]).status_code == 401


def test_feedback_answers_503_instead_of_hanging(
    outage_client: TestClient, auth: dict[str, dict[str, str]], outage: Outage
) -> None:
    client = outage_client
    cid = _complete(client, auth["ide"]).json()["id"]
    flush(client)
    outage.start()
    _complete(client, auth["ide"])  # a record now waits for the database
    event_ = {
        "id": "event-0001",
        "completion_id": cid,
        "type": "shown",
        "timestamp": "2026-12-02T06:00Z",
    }
    response = client.post("/v1/events", headers=auth["ide"], json={"events": [event_]})
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers
    outage.end()
    flush(client)
    client.app.state.recorder.database_available = None  # type: ignore[attr-defined]
    outage.start()  # nothing is queued now: the write itself meets the outage
    response = client.post("/v1/events", headers=auth["ide"], json={"events": [event_]})
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers
    assert response.json()["error"]["code"] == "database_unavailable"


def test_readyz_reports_the_database(outage_client: TestClient, outage: Outage) -> None:
    ready = outage_client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["dependencies"]["database"] == "ok"
    outage.start()
    outage_client.app.state.readyz_database = None  # type: ignore[attr-defined]  # no cached probe
    response = outage_client.get("/readyz")
    assert response.status_code == 200  # the engine still serves recent tokens
    assert response.json()["status"] == "degraded"
    assert response.json()["dependencies"]["database"] == "unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_no_response_completes_before_its_record_is_journaled(
    outage_client: TestClient,
    auth: dict[str, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    release = threading.Event()
    real_append = Journal.append

    def slow_append(self: Journal, records: Any) -> None:
        assert release.wait(30), "the test never released the journal"
        real_append(self, records)

    monkeypatch.setattr(Journal, "append", slow_append)
    done = threading.Event()
    result: list[httpx.Response] = []

    def request() -> None:
        result.append(_complete(outage_client, auth["ide"], stream=stream))
        done.set()

    thread = threading.Thread(target=request)
    thread.start()
    try:
        # The engine answers in milliseconds; the response must still wait for the fsync.
        assert not done.wait(1.0), "the response completed before its record was journaled"
    finally:
        release.set()
        thread.join(30)
    assert done.is_set() and result[0].status_code == 200
    if stream:
        assert result[0].text.rstrip().endswith("data: [DONE]")


def test_a_database_that_hangs_does_not_hang_requests(
    outage_client: TestClient, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database behind a dead network link answers nothing at all; a recently verified token
    must still complete (after a bounded lookup), and the next request skips the database."""
    from server.services import auth as auth_module

    client = outage_client
    assert _complete(client, auth["ide"]).status_code == 200
    flush(client)
    monkeypatch.setattr(auth_module, "LOOKUP_TIMEOUT_S", 0.2)
    release = threading.Event()

    def hang(*_: Any) -> None:
        if not release.wait(10):  # nobody may wait this long for the database
            raise RuntimeError("a request waited 10 s for a database that hangs")

    event.listen(Engine, "before_cursor_execute", hang)
    try:
        first = _complete(client, auth["ide"])
        second = _complete(client, auth["ide"], stream=True)
        assert (first.status_code, second.status_code) == (200, 200)
        release.set()
        flush(client)
    finally:
        release.set()
        # Only now: removing a listener while a statement runs it breaks that statement.
        event.remove(Engine, "before_cursor_execute", hang)
    assert _stored(client) == 3
