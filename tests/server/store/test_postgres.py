"""The scale path: several server replicas recording into one PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from server.app import create_app
from server.config import Settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import converge, served_by
from tests.utils.postgres import ADMIN_URL, pg_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped afterwards."""
    with pg_database() as url:
        yield url


def test_migrations_apply_and_match_the_models(pg_url: str) -> None:
    from alembic import command
    from server.store.db import alembic_config

    upgrade(pg_url)
    command.check(alembic_config(pg_url))


def test_two_replicas_record_into_one_database(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with make_session_factory(engine)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
    headers = {"Authorization": f"Bearer {secret}"}
    settings = Settings(_env_file=None, home=tmp_path, database_url=pg_url)  # type: ignore[call-arg]
    ids: list[str] = []
    with (
        TestClient(create_app(settings, engine=FakeEngine())) as a,
        TestClient(create_app(settings, engine=FakeEngine())) as b,
    ):
        for i in range(10):
            replica = a if i % 2 else b
            response = replica.post(
                "/v1/completions",
                headers=headers,
                json={
                    "model": "fake-model",
                    "prompt": f"p{i}",
                    "max_tokens": 3,
                    "stream": i % 3 == 0,
                },
            )
            assert response.status_code == 200
            ids.append(
                response.json()["id"]
                if i % 3
                else response.text.split('"id":"', 1)[1].split('"', 1)[0]
            )
    with engine.connect() as conn:
        stored = set(conn.execute(text("SELECT id FROM completions")).scalars())
        choices = conn.execute(text("SELECT count(*) FROM completion_choices")).scalar()
    engine.dispose()
    assert stored == set(ids) and len(stored) == 10 and choices == 10


def test_two_replicas_converge_on_the_active_and_canary_set(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two servers on loopback, one database: a change made through one replica reaches the
    other's routing by polling, within a few poll intervals."""

    import httpx

    from tests.utils.adapters import BASE_SHA, approved_adapter
    from tests.utils.live_server import live_server

    upgrade(pg_url)
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    with factory() as session:
        ide = create_token(session=session, name="ide", role=Role.IDE)[1]
        ops = create_token(session=session, name="ops", role=Role.OPS)[1]
    for name in ("v1", "v2"):
        approved_adapter(factory, tmp_path, name)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=tmp_path, database_url=pg_url, rollout_poll_seconds=0.2
    )

    ops_headers = {"Authorization": f"Bearer {ops}"}
    app_a = create_app(settings, engine=FakeEngine(base_sha256=BASE_SHA))
    app_b = create_app(settings, engine=FakeEngine(base_sha256=BASE_SHA))
    with live_server(app_a) as a, live_server(app_b) as b:
        assert served_by(a.url, ide) == served_by(b.url, ide) == "base"
        r = httpx.post(
            f"{a.url}/v1/adapters/v1/promote", headers=ops_headers, json={"to": "active"}
        )
        assert r.status_code == 200, r.text
        assert served_by(a.url, ide) == "v1"  # at once on the replica that made the change
        converge(b.url, ide, "v1")
        httpx.post(f"{b.url}/v1/adapters/v2/promote", headers=ops_headers, json={"to": "canary"})
        httpx.put(f"{b.url}/v1/rollout", headers=ops_headers, json={"canary_share": 1.0})
        converge(a.url, ide, "v2")
        httpx.post(f"{a.url}/v1/rollout/rollback", headers=ops_headers, json={})
        converge(b.url, ide, "v1")
        state = httpx.get(f"{b.url}/v1/rollout", headers=ops_headers).json()
        assert state["replica"]["active"] == "v1" and state["replica"]["canary"] is None
    engine.dispose()


def test_text_with_nul_characters_is_recorded(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL refuses NUL in text; a model that emits one must still leave its record."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with make_session_factory(engine)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
    settings = Settings(_env_file=None, home=tmp_path, database_url=pg_url)  # type: ignore[call-arg]
    fake = FakeEngine(reply=lambda prompt, adapter, index: "a\x00b")
    with TestClient(create_app(settings, engine=fake)) as client:
        r = client.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "fake-model", "prompt": "p\x00q", "max_tokens": 5},
        )
        assert r.status_code == 200
        client.portal.call(client.app.state.recorder.flush)  # type: ignore[attr-defined]
    with engine.connect() as conn:
        prompt = conn.execute(text("SELECT prompt FROM completions")).scalar()
        choice = conn.execute(text("SELECT text FROM completion_choices")).scalar()
    engine.dispose()
    assert prompt == "p\ufffdq" and choice == "a\ufffdb"


def test_nul_in_strings_chosen_by_clients_is_stored(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A NUL in context.language once left the row only in the log (the client got 200), and
    one in a ledger repository was a 500: both are stored, with U+FFFD for the NUL."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with make_session_factory(engine)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
    headers = {"Authorization": f"Bearer {secret}"}
    settings = Settings(_env_file=None, home=tmp_path, database_url=pg_url)  # type: ignore[call-arg]
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        r = client.post(
            "/v1/completions",
            headers=headers,
            json={
                "model": "fake-model",
                "prompt": "p",
                "max_tokens": 3,
                "context": {"language": "py\x00thon"},
            },
        )
        assert r.status_code == 200, r.text
        cid = r.json()["id"]
        client.portal.call(client.app.state.recorder.flush)  # type: ignore[attr-defined]
        assert client.app.state.recorder.rejected == 0  # type: ignore[attr-defined]
        entry = {
            "completion_id": cid,
            "repository": "github.com/a/\x00b",
            "file_path": "f.py",
            "inserted_text": "x",
            "current_text": "x",
            "updated_at": "2026-12-02T06:00:00Z",
        }
        put = client.put("/v1/ledger", headers=headers, json={"entries": [entry]})
        assert put.status_code == 200, put.text
    with engine.connect() as conn:
        language = conn.execute(text("SELECT language FROM completions")).scalar()
        repository = conn.execute(text("SELECT repository FROM ledger_entries")).scalar()
    engine.dispose()
    assert language == "py\ufffdthon" and repository == "github.com/a/\ufffdb"


def _deny_connections(name: str, deny: bool) -> None:
    """An outage of one database on the shared server: refuse new sessions, end the open ones."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not deny).lower()}'))
        if deny:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
    admin.dispose()


def test_an_outage_keeps_serving_and_loses_no_record(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL refuses connections for a while: a recently seen token keeps completing (it
    was a 500 for everyone once the token cache expired), feedback answers 503 at once, and
    every answered completion is stored exactly once after the database is back."""
    upgrade(pg_url)
    name = make_url(pg_url).database
    assert name is not None
    engine = make_engine(pg_url)
    with make_session_factory(engine)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
        _, unseen = create_token(session=session, name="other", role=Role.IDE)
    engine.dispose()
    headers = {"Authorization": f"Bearer {secret}"}
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=tmp_path, database_url=pg_url, auth_cache_seconds=0
    )
    body = {"model": "fake-model", "prompt": "p", "max_tokens": 3}
    ids: list[str] = []
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        client.app.state.recorder._retry_delay = 0.1  # type: ignore[attr-defined]
        r = client.post("/v1/completions", headers=headers, json=body)
        ids.append(r.json()["id"])
        _deny_connections(name, True)
        try:
            for i in range(6):
                r = client.post(
                    "/v1/completions", headers=headers, json={**body, "stream": i % 2 == 0}
                )
                assert r.status_code == 200, r.text
                ids.append(
                    r.text.split('"id":"', 1)[1].split('"', 1)[0] if i % 2 == 0 else r.json()["id"]
                )
            other = client.post(
                "/v1/completions", headers={"Authorization": f"Bearer {unseen}"}, json=body
            )
            assert other.status_code == 503 and "retry-after" in other.headers
            event = {"id": "event-0001", "completion_id": ids[0], "type": "shown",
                     "timestamp": "2026-12-02T06:00:00Z"}  # fmt: skip
            feedback = client.post("/v1/events", headers=headers, json={"events": [event]})
            assert feedback.status_code == 503 and "retry-after" in feedback.headers
            ready = client.get("/readyz").json()
            assert ready["dependencies"]["database"] == "unavailable", ready
        finally:
            _deny_connections(name, False)
        client.portal.call(client.app.state.recorder.flush)  # type: ignore[attr-defined]
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        stored = list(conn.execute(text("SELECT id FROM completions")).scalars())
    engine.dispose()
    assert sorted(stored) == sorted(ids) and len(stored) == 7


@pytest.mark.timeout(60)
def test_postgres_connections_give_up_when_the_server_stops_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database host that accepts TCP but never answers (a hung server, a dead proxy) must
    fail the connection after the connect timeout, not hold the request for minutes."""
    import socket

    from sqlalchemy.exc import OperationalError

    import server.store.db as db

    monkeypatch.setattr(db, "PG_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:  # the kernel completes handshakes; nobody ever replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        engine = db.make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
        try:
            with pytest.raises(OperationalError, match="timeout"), engine.connect():
                pass
        finally:
            engine.dispose()
