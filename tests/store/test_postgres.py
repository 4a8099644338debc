"""The scale path: several server replicas recording into one PostgreSQL database."""

from __future__ import annotations

import os
import uuid
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

ADMIN_URL = os.environ.get(
    "KAIZEN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped afterwards."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"kaizen_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is not reachable: {exc}")
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
