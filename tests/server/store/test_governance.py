"""Governance in the store: repositories excluded from training (store functions and `kaizen
repos`), and the retention window (what is deleted, what is kept), on a migrated database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from kaizen.cli import app
from server.config import get_settings
from server.store import registry
from server.store import rounds as round_store
from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.db import upgrade
from server.store.feedback import save_outcome
from server.store.governance import (
    exclude_repository,
    excluded_repositories,
    include_repository,
    list_excluded,
    prune_records,
)
from server.store.models import (
    Adapter,
    CiRun,
    Completion,
    CompletionOutcome,
    RecordedChoice,
    TrainingRound,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_exclude_include_list(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        row = exclude_repository(
            session=session,
            repository="git@github.com:Acme/Secret.git",
            actor="ops:alice",
            reason="customer contract",
        )
        assert row.repository == "github.com/acme/secret"  # normalised like the clients
        again = exclude_repository(session=session, repository="github.com/acme/secret", actor="x")
        assert again.excluded_by == "ops:alice"  # the first exclusion stands
        assert excluded_repositories(session=session) == {"github.com/acme/secret"}
        assert [r.reason for r in list_excluded(session=session)] == ["customer contract"]
        assert include_repository(session=session, repository="https://github.com/acme/secret")
        assert not include_repository(session=session, repository="github.com/acme/secret")
        assert excluded_repositories(session=session) == frozenset()
        with pytest.raises(ValueError):
            exclude_repository(session=session, repository="  ", actor="x")


def _completion(session: Session, cid: str, created_at: datetime) -> None:
    save_completions(
        session=session,
        records=[
            CompletionRecord(
                id=cid,
                created_at=created_at,
                token_id=None,
                endpoint="completions",
                model="m",
                adapter=None,
                prompt="def f():\n    ",
                suffix="\n",
                params={},
                stream=False,
                context={"repository": "github.com/acme/app"},
                choices=[ChoiceRecord(index=0, text="return 1")],
            )
        ],
    )


def _outcome(session: Session, run_id: str, cid: str) -> None:
    save_outcome(
        session=session,
        run={"run_id": run_id, "repository": "github.com/acme/app", "commit": "c",
             "status": "passed", "tests": []},
        completions=[{"completion_id": cid, "choice_index": 0, "file_path": "f.py",
                      "final_text": "return 1", "status": "passed", "tests": []}],
        raw={},
        token_id=None,
    )  # fmt: skip


def _count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_prune_deletes_old_records_and_keeps_the_audit_trail(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory() as session:
        _completion(session, "cmpl-old", NOW - timedelta(days=40))
        _completion(session, "cmpl-new", NOW - timedelta(days=1))
        _outcome(session, "ci:recent", "cmpl-new")  # received now: kept
        _outcome(session, "ci:new-run", "cmpl-old")  # about an old completion: goes with it
        # A run received long ago (a report about a recent completion, spooled for weeks).
        _outcome(session, "ci:ancient", "cmpl-new")
        ancient = session.scalars(select(CiRun).where(CiRun.run_id == "ci:ancient")).one()
        ancient.received_at = NOW - timedelta(days=60)
        session.commit()
        registry.register_adapter(session=session, name="kaizen-r1-x", path="/a", base_sha256="0",
                                  manifest={"record_ids": ["cmpl-old:0:ci:new-run"]},
                                  parent_id=None, round_id=None, actor="trainer")  # fmt: skip
        round_store.start_round(session=session, trigger="manual", records_until=NOW,
                                parent_adapter_id=None, work_dir="", config={})  # fmt: skip

        result = prune_records(session=session, retention_days=30, now=NOW)

        assert result.cutoff == NOW - timedelta(days=30)
        assert (result.completions, result.ci_runs) == (1, 1)
        assert result.outcomes == 2  # the old completion's, and the ancient run's
        assert list(session.scalars(select(Completion.id))) == ["cmpl-new"]
        assert list(session.scalars(select(RecordedChoice.completion_id))) == ["cmpl-new"]
        assert sorted(session.scalars(select(CiRun.run_id))) == ["ci:new-run", "ci:recent"]
        assert list(session.scalars(select(CompletionOutcome.run_id))) == ["ci:recent"]
        assert _count(session, Adapter) == 1 and _count(session, TrainingRound) == 1
        # Nothing older is left: a second prune deletes nothing.
        assert prune_records(session=session, retention_days=30, now=NOW).total == 0
        with pytest.raises(ValueError, match="retention_days"):
            prune_records(session=session, retention_days=0)


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KAIZEN_HOME", str(tmp_path))
    monkeypatch.delenv("KAIZEN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    upgrade(get_settings().database_url)
    yield tmp_path
    get_settings.cache_clear()


def test_kaizen_repos_exclude_include_list(cli_home: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["repos", "list"])
    assert empty.exit_code == 0 and "no repository is excluded" in empty.output
    done = runner.invoke(
        app, ["repos", "exclude", "https://github.com/Acme/App.git", "--reason", "legal hold"]
    )
    assert done.exit_code == 0, done.output
    assert "excluded github.com/acme/app from training" in done.output
    listing = runner.invoke(app, ["repos", "list"])
    assert "github.com/acme/app" in listing.output and "legal hold" in listing.output
    back = runner.invoke(app, ["repos", "include", "github.com/acme/app"])
    assert back.exit_code == 0 and "trains again" in back.output
    missing = runner.invoke(app, ["repos", "include", "github.com/acme/app"])
    assert missing.exit_code == 1 and "is not excluded" in missing.output
