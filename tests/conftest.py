"""Shared fixtures: a migrated database per test, settings without the environment, tokens for
each role, and a test client over the app with the fake engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from tests.utils.fake_engine import FakeEngine

# A real S3-compatible server process (moto) for the object-store tests: fixtures `s3`, `aws_env`.
pytest_plugins = ["tests.utils.s3_server"]


@pytest.fixture(scope="session")
def bundled_model_cache() -> Path:
    """Where tests prepare the bundled model: KAIZEN_TEST_MODEL_CACHE, else the same cache
    `make serve` uses ($KAIZEN_HOME/models), so it is downloaded and converted only once."""
    override = os.environ.get("KAIZEN_TEST_MODEL_CACHE")
    if override:
        return Path(override).expanduser()
    cache = Settings().model_cache
    assert cache is not None
    return cache


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'kaizen.db'}"
    upgrade(url)
    return url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        _env_file=None,
        home=tmp_path,
        database_url=db_url,  # type: ignore[call-arg]
        auth_cache_seconds=0,
    )


@pytest.fixture
def session_factory(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def tokens(session_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """One secret per role: {"ide": "kz_...", "ci": ..., "ops": ...}."""
    with session_factory() as session:
        return {
            role.value: create_token(session=session, name=f"test-{role.value}", role=role)[1]
            for role in Role
        }


@pytest.fixture
def auth(tokens: dict[str, str]) -> dict[str, dict[str, str]]:
    """Authorization headers per role."""
    return {role: {"Authorization": f"Bearer {secret}"} for role, secret in tokens.items()}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=fake_engine)) as test_client:
        yield test_client
