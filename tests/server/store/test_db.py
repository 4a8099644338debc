"""Migrations, the start-up check, and the recorder's guarantees against a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

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
from server.store.journal import Journal


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
    bad = _record(9)
    bad.token_id = 12345  # no such token: the foreign key refuses the row
    for record in (_record(2), bad, _record(3)):
        recorder.submit(record)
    await recorder.stop()
    with session_factory() as session:
        assert count_completions(session=session) == 3
    assert recorder.rejected == 1
    assert "event=record_rejected" in caplog.text and '"id": "cmpl-9"' in caplog.text


async def test_a_record_submitted_twice_is_stored_once(db_url: str) -> None:
    """Replaying a journal can hand the writer records the database has: they are skipped,
    not refused."""
    session_factory = make_session_factory(make_engine(db_url))
    recorder = Recorder(session_factory)
    recorder.start()
    recorder.submit(_record(1))
    await recorder.flush()
    for record in (_record(2), _record(1), _record(3)):
        recorder.submit(record)
    await recorder.stop()
    with session_factory() as session:
        assert count_completions(session=session) == 3
    assert (recorder.written, recorder.duplicates, recorder.rejected) == (3, 1, 0)


async def test_stop_during_an_outage_is_bounded_and_the_next_start_replays(
    tmp_path: Path,
) -> None:
    """SIGTERM while the database is down: the server leaves the records in the journal after
    ``drain_timeout`` instead of waiting for the database, and the next start writes them."""
    url = f"sqlite:///{tmp_path / 'later.db'}"  # no schema yet: every write fails
    session_factory = make_session_factory(make_engine(url))
    journal_dir = tmp_path / "journal"
    recorder = Recorder(
        session_factory, journal=Journal(journal_dir), retry_delay=0.05, drain_timeout=0.5
    )
    recorder.start()
    for i in range(4):
        recorder.submit(_record(i))
    await asyncio.wait_for(recorder.stop(), timeout=30)
    assert recorder.written == 0 and recorder.database_available is False
    assert list(journal_dir.glob("records-*.jsonl"))

    upgrade(url)  # the database is back
    again = Recorder(session_factory, journal=Journal(journal_dir))
    again.start()
    await again.stop()
    assert again.written == 4
    with session_factory() as session:
        assert count_completions(session=session) == 4
    assert list(journal_dir.glob("records-*.jsonl")) == []


_CRASHING_SERVER = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from tests.server.store.test_db import _record
from server.services.recorder import Recorder
from server.store.journal import Journal
from server.store.db import make_engine, make_session_factory
from server.store.journal import Journal

async def main():
    recorder = Recorder(make_session_factory(make_engine({url!r})),
                        journal=Journal(__import__("pathlib").Path({journal!r})), retry_delay=0.05)
    recorder.start()
    for i in range(4):
        recorder.submit(_record(i))
    await recorder.wait_durable(4)  # what the response waits for before it is sent
    print("acknowledged", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_kill_9_during_an_outage_loses_no_acknowledged_record(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'later.db'}"
    journal_dir = tmp_path / "journal"
    script = _CRASHING_SERVER.format(
        repo=str(Path(__file__).resolve().parents[3]), url=url, journal=str(journal_dir)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "acknowledged"
    finally:
        proc.kill()
        proc.wait(30)
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    for _ in range(2):  # a second restart finds nothing more to replay
        recorder = Recorder(session_factory, journal=Journal(journal_dir))
        recorder.start()
        await recorder.stop()
    with session_factory() as session:
        assert count_completions(session=session) == 4
        for i in range(4):
            assert get_completion(session=session, completion_id=f"cmpl-{i}") is not None


def test_migrations_match_the_models(db_url: str) -> None:
    from alembic import command
    from server.store.db import alembic_config

    command.check(alembic_config(db_url))  # raises if the models need a new revision


def test_session_scope_disposes_its_engine_however_the_block_ends(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.store import db as db_module

    disposed: list[object] = []
    real = db_module.make_engine

    def tracking(url: str):  # type: ignore[no-untyped-def]
        engine = real(url)
        monkeypatch.setattr(engine, "dispose", lambda: disposed.append(engine))
        return engine

    monkeypatch.setattr(db_module, "make_engine", tracking)
    with db_module.session_scope(db_url) as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    with pytest.raises(RuntimeError), db_module.session_scope(db_url):
        raise RuntimeError("a command failed half-way")
    assert len(disposed) == 2
