"""Migrations, the start-up check, and the recorder's guarantees against a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect

from server.services.recorder import Recorder
from server.store.completions import (
    ChoiceRecord,
    CompletionRecord,
    count_completions,
    get_completion,
)
from server.store.db import (
    DatabaseNotMigratedError,
    check_migrated,
    make_engine,
    make_session_factory,
    upgrade,
)


def _record(i: int) -> CompletionRecord:
    return CompletionRecord(
        id=f"cmpl-{i}",
        created_at=datetime.now(UTC),
        token_id=None,
        endpoint="completions",
        model="m",
        adapter=None,
        prompt="p",
        params={},
        stream=False,
        choices=[ChoiceRecord(index=0, text=f"t{i}", finish_reason="stop", tokens=2)],
    )


def test_unmigrated_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(DatabaseNotMigratedError, match="kaizen db upgrade"):
        check_migrated(engine)


def test_upgrade_creates_schema_and_passes_check(db_url: str) -> None:
    engine = make_engine(db_url)
    check_migrated(engine)
    assert {"api_tokens", "completions", "completion_choices"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


async def test_recorder_stop_writes_everything_queued(db_url: str) -> None:
    session_factory = make_session_factory(make_engine(db_url))
    recorder = Recorder(session_factory, batch_size=7)
    recorder.start()
    for i in range(50):
        recorder.submit(_record(i))
    await recorder.stop()
    with session_factory() as session:
        assert count_completions(session=session) == 50
        row = get_completion(session=session, completion_id="cmpl-49")
        assert row is not None and row.choices[0].text == "t49"
        assert row.completion_tokens == 2


async def test_recorder_keeps_records_while_database_is_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'later.db'}"
    session_factory = make_session_factory(make_engine(url))
    recorder = Recorder(session_factory, retry_delay=0.05)
    recorder.start()
    recorder.submit(_record(1))  # no schema yet: the write fails with OperationalError
    await asyncio.sleep(0.2)
    assert recorder.written == 0
    upgrade(url)  # the database comes back
    await asyncio.wait_for(recorder.stop(), timeout=10)
    with session_factory() as session:
        assert count_completions(session=session) == 1


async def test_recorder_logs_a_refused_record_and_writes_the_rest(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    session_factory = make_session_factory(make_engine(db_url))
    recorder = Recorder(session_factory)
    recorder.start()
    recorder.submit(_record(1))
    await recorder.flush()
    for record in (_record(2), _record(1), _record(3)):  # cmpl-1 again: primary-key clash
        recorder.submit(record)
    await recorder.stop()
    with session_factory() as session:
        assert count_completions(session=session) == 3
    assert "event=record_rejected" in caplog.text and '"id": "cmpl-1"' in caplog.text


def test_migrations_match_the_models(db_url: str) -> None:
    from alembic import command
    from server.store.db import alembic_config

    command.check(alembic_config(db_url))  # raises if the models need a new revision
