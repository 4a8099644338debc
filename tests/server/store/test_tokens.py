"""Token scopes: the store's rules and ``kaizen tokens create`` / ``list`` as an operator runs
them (a real migrated database through the settings)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kaizen.cli import app
from server.config import get_settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import (
    Principal,
    Role,
    TokenScopeError,
    create_token,
    find_principal,
)


@pytest.fixture
def database(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KAIZEN_HOME", str(tmp_path))
    monkeypatch.delenv("KAIZEN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    url = get_settings().database_url
    upgrade(url)
    yield url
    get_settings.cache_clear()


def _principal(url: str, secret: str) -> Principal | None:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return find_principal(session=session, secret=secret)
    finally:
        engine.dispose()


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["tokens", *args])


def test_cli_creates_a_scoped_ci_token(database: str) -> None:
    result = _invoke(
        "create", "--role", "ci", "--name", "app-ci",
        "--repo", "git@github.com:Acme/App.git", "--repo", "github.com/acme/lib",
        "--repo", "https://github.com/acme/app",  # the first one again, spelled otherwise
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("kz_") and "\n" not in secret  # alone on stdout
    assert "github.com/acme/app, github.com/acme/lib" in result.stderr
    principal = _principal(database, secret)
    assert principal is not None and principal.role is Role.CI
    assert principal.repositories == frozenset({"github.com/acme/app", "github.com/acme/lib"})
    assert principal.covers("https://GitHub.com/acme/lib.git")
    assert not principal.covers("github.com/acme/other") and not principal.covers(None)


def test_cli_all_repos_token_covers_everything(database: str) -> None:
    result = _invoke("create", "--role", "ci", "--name", "shared", "--all-repos")
    assert result.exit_code == 0, result.output
    principal = _principal(database, result.stdout.strip())
    assert principal is not None and principal.repositories is None
    assert principal.covers("github.com/anyone/anything")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--role", "ci", "--name", "x"], "pass --repo github.com/acme/app (repeatable)"),
        (["--role", "ci", "--name", "x", "--repo", "a/b", "--all-repos"], "not both"),
        (["--role", "ide", "--name", "x", "--repo", "a/b"], "are for ci tokens"),
        (["--role", "ops", "--name", "x", "--all-repos"], "are for ci tokens"),
        (["--role", "ci", "--name", "x", "--repo", " "], "bad repository"),
    ],
)
def test_cli_refuses_an_unclear_scope(database: str, args: list[str], needle: str) -> None:
    result = _invoke("create", *args)
    assert result.exit_code == 1
    assert needle in result.output
    assert "kz_" not in result.output
    listing = _invoke("list")
    assert listing.exit_code == 0 and len(listing.stdout.strip().splitlines()) == 1  # header


def test_cli_list_shows_each_tokens_scope(database: str) -> None:
    for args in (
        ["--role", "ci", "--name", "app-ci", "--repo", "github.com/acme/app"],
        ["--role", "ci", "--name", "shared", "--all-repos"],
        ["--role", "ide", "--name", "alice"],
        ["--role", "ops", "--name", "admin"],
    ):
        assert _invoke("create", *args).exit_code == 0
    lines = _invoke("list").stdout.strip().splitlines()
    assert lines[0].split()[-2:] == ["name", "scope"]
    scopes = {line.split()[6]: line for line in lines[1:]}
    assert scopes["app-ci"].endswith("github.com/acme/app")
    assert scopes["shared"].endswith("all repositories")
    assert scopes["alice"].endswith("completions of 'alice'")
    assert scopes["admin"].endswith("everything")


def test_store_defaults_and_refusals(database: str) -> None:
    engine = make_engine(database)
    with make_session_factory(engine)() as session:
        legacy, _ = create_token(session=session, name="old-style", role=Role.CI)
        assert legacy.all_repositories and legacy.repositories == []
        ide, _ = create_token(session=session, name="alice", role=Role.IDE)
        assert ide.all_repositories  # not scoped by repository at all
        with pytest.raises(TokenScopeError, match="at least one repository"):
            create_token(session=session, name="empty", role=Role.CI, repositories=[])
        with pytest.raises(TokenScopeError, match="only ci tokens"):
            create_token(session=session, name="bob", role=Role.IDE, repositories=["a/b"])
    engine.dispose()


def test_ownership_is_by_token_or_its_owners_name() -> None:
    alice = Principal(token_id=1, name="alice", role=Role.IDE)
    assert alice.owns(token_id=1, owner="alice")
    assert alice.owns(token_id=7, owner="alice")  # her replacement or second machine
    assert not alice.owns(token_id=2, owner="mallory")
    assert not alice.owns(token_id=None, owner=None)  # served to nobody known
    assert Principal(token_id=3, name="ops", role=Role.OPS).owns(token_id=2, owner="mallory")
