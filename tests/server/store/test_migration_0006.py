"""Migration 0006 re-keys CI runs by (repository, run id): rows of a 0005 database survive,
outcomes keep their runs, and two repositories may then hold the same run id (SQLite and
PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.feedback import save_outcome
from server.store.models import CiRun, CompletionOutcome
from tests.utils.postgres import pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kaizen.db'}"
    else:
        with pg_database() as pg_url:
            yield pg_url


def _fill_0005(url: str) -> None:
    engine = make_engine(url)
    with make_session_factory(engine)() as session:  # the completions tables are as in 0005
        save_completions(
            session=session,
            records=[
                CompletionRecord(
                    id="cmpl-1",
                    created_at=datetime.now(UTC),
                    token_id=None,
                    endpoint="completions",
                    model="tiny",
                    adapter=None,
                    prompt="def f():\n",
                    suffix="\n",
                    params={},
                    stream=False,
                    context={},
                    choices=[ChoiceRecord(index=0, text="return 1", tokens=2)],
                )
            ],
        )
    with engine.begin() as conn:
        for run_id, repo in [("run-1", "git@github.com:Acme/App.git"), ("run-2", "")]:
            conn.execute(
                text(
                    'INSERT INTO ci_runs (run_id, repository, "commit", status, tests, '
                    "log_tail, raw, received_at) VALUES (:r, :repo, 'abc', 'passed', '[]', '', "
                    "'{}', CURRENT_TIMESTAMP)"
                ),
                {"r": run_id, "repo": repo},
            )
            conn.execute(
                text(
                    "INSERT INTO completion_outcomes (run_id, completion_id, choice_index, "
                    "file_path, final_text, status, tests, received_at) VALUES (:r, 'cmpl-1', "
                    "0, 'f.py', 'x', 'passed', '[]', CURRENT_TIMESTAMP)"
                ),
                {"r": run_id},
            )
    engine.dispose()


def test_0006_keeps_runs_and_outcomes_and_keys_runs_by_repository(url: str) -> None:
    upgrade(url, "0005")
    _fill_0005(url)
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            runs = {r.run_id: r for r in session.scalars(select(CiRun))}
            assert runs["run-1"].repository_key == "github.com/acme/app"
            assert runs["run-2"].repository_key == ""  # not a repository: kept as it was
            outcomes = session.scalars(select(CompletionOutcome)).all()
            assert {(o.run_id, o.ci_run_id) for o in outcomes} == {
                (r.run_id, r.id) for r in runs.values()
            }
            run = {
                "run_id": "run-1",
                "commit": "def",
                "branch": None,
                "status": "failed",
                "started_at": None,
                "finished_at": None,
                "tests": [],
                "log_tail": "",
            }
            completions = [
                {
                    "completion_id": "cmpl-1",
                    "choice_index": 0,
                    "file_path": "f.py",
                    "final_text": "y",
                    "status": "failed",
                    "tests": [],
                }
            ]
            other = save_outcome(
                session=session,
                run={**run, "repository": "github.com/b/c"},
                completions=completions,
                raw={},
                token_id=None,
            )
            assert not other.duplicate and other.completions == 1  # ids continue after the copy
            again = save_outcome(
                session=session,
                run={**run, "repository": "github.com/acme/app"},
                completions=completions,
                raw={},
                token_id=None,
            )
            assert again.duplicate
            newest = select(CompletionOutcome.id).order_by(CompletionOutcome.id.desc()).limit(1)
            assert session.scalar(newest) == 3
    finally:
        engine.dispose()
