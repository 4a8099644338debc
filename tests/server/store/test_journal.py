"""The local journal: fsynced appends that survive a crash, replay of what a dead process left
(exactly once, torn last line skipped), and no replay of a segment a live process holds."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.store.completions import ChoiceRecord, CompletionRecord, count_completions
from server.store.db import make_engine, make_session_factory
from server.store.journal import Journal, save_new_completions

REPO = Path(__file__).resolve().parents[3]


def _record(i: int, text: str = "") -> CompletionRecord:
    return CompletionRecord(
        id=f"cmpl-{i}",
        created_at=datetime(2026, 12, 2, 6, 0, i % 60, tzinfo=UTC),
        token_id=None,
        endpoint="completions",
        model="m",
        adapter="v1",
        prompt=f"def f{i}():",
        params={"max_tokens": 4, "stop": ["\n"]},
        stream=True,
        context={"language": "python", "repository": None},
        choices=[ChoiceRecord(index=0, text=text or f"t{i}", finish_reason="stop", tokens=2)],
    )


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("records-*.jsonl"))


def test_records_round_trip_and_files_are_private(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    assert journal.open() == []
    records = [_record(1, "naïve \x00 ✓"), _record(2)]
    journal.append(records)
    (segment,) = _segments(tmp_path / "journal")
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "journal").stat().st_mode) == 0o700
    journal.close()  # records not committed: the segment stays for the next start

    again = Journal(tmp_path / "journal")
    assert again.open() == records  # equal dataclasses, datetimes and choices included
    again.close()


def test_committed_records_are_forgotten_and_their_segments_deleted(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=300, rotate_idle_bytes=10**9)
    journal.open()
    journal.append([_record(1)])
    journal.append([_record(2)])  # the first segment is full by now: a second one takes this
    assert len(_segments(tmp_path)) >= 2
    journal.committed(["cmpl-1"])
    assert journal.pending == 1
    journal.committed(["cmpl-2"])
    assert journal.pending == 0
    assert len(_segments(tmp_path)) == 1  # only the segment that takes appends is left
    assert journal.close() == 0
    assert _segments(tmp_path) == []


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append([_record(1), _record(2)])
    (segment,) = _segments(tmp_path)
    journal.close()
    with segment.open("ab") as f:  # a kill -9 in the middle of an append
        f.write(b'{"id":"cmpl-3","created_at":"2026-')
    again = Journal(tmp_path)
    assert [r.id for r in again.open()] == ["cmpl-1", "cmpl-2"]
    again.close()


def test_a_failed_append_leaves_no_torn_line_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    journal.open()
    journal.append([_record(1)])
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:  # half a line, then the disk is full
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError):
        journal.append([_record(2)])
    monkeypatch.setattr(os, "write", real_write)
    journal.append([_record(3)])
    journal.close()
    again = Journal(tmp_path)
    assert [r.id for r in again.open()] == ["cmpl-1", "cmpl-3"]
    again.close()


def test_a_live_process_keeps_its_segment(tmp_path: Path) -> None:
    """A replica sharing the directory must not replay (and so double-count or delete) the
    segment of a server that is still running."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.server.store.test_journal import _record
        from server.store.journal import Journal
        j = Journal(__import__("pathlib").Path({str(tmp_path)!r}))
        j.open()
        j.append([_record(7)])
        print("ready", flush=True)
        sys.stdin.read()
        """
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        mine = Journal(tmp_path)
        assert mine.open() == []  # locked by the other process
        mine.close()
        other.kill()  # dies without cleaning up, as with kill -9
        other.wait(10)
        after = Journal(tmp_path)
        assert [r.id for r in after.open()] == ["cmpl-7"]
        after.close()
    finally:
        if other.poll() is None:
            other.kill()


def test_replay_stores_each_record_once(db_url: str) -> None:
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session:
        assert save_new_completions(session=session, records=[_record(1), _record(2)]) == 0
    with factory() as session:  # a journal replayed after the database already had two
        assert save_new_completions(session=session, records=[_record(2), _record(3)]) == 1
        assert count_completions(session=session) == 3
    engine.dispose()


def test_a_record_from_another_version_is_still_read(tmp_path: Path) -> None:
    """A journal left by a newer server (a field this one lacks) or an older one (a field
    missing) is replayed, not skipped as unreadable."""
    import json

    from server.store.journal import record_to_line

    data = json.loads(record_to_line(_record(1)))
    data["added_later"] = "x"
    data["choices"][0]["also_new"] = 1
    del data["suffix"]
    (tmp_path / "records-1-1.jsonl").write_bytes(json.dumps(data).encode() + b"\n")
    journal = Journal(tmp_path)
    (record,) = journal.open()
    assert record.id == "cmpl-1" and record.suffix is None and record.choices[0].text == "t1"
    journal.close()
