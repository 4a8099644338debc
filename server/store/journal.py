"""A local write-ahead journal of completion records, so that no acknowledged record is lost.

A record is appended here (write plus ``fsync``) before its response completes, and removed once
the database has it. A server killed with SIGKILL, or stopped while the database is down, leaves
its segment files behind; the next server that starts on the same journal directory replays them.
Replay is exactly once because :func:`save_new_completions` skips records already stored (record
ids are unique), whoever stored them.

Layout: ``records-<ns>-<pid>.jsonl`` segment files (mode 0600) in a directory (mode 0700), one
JSON record per line. A live server holds an exclusive ``flock`` on each of its segments, so a
second replica sharing the directory never replays (or deletes) a segment still in use. A torn
last line (a kill during an append) belongs to a response that was never sent: it is skipped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.models import Completion

log = logging.getLogger(__name__)

SEGMENT_GLOB = "records-*.jsonl"


class DatabaseUnavailableError(RuntimeError):
    """The database does not accept connections or writes right now (an outage, not a bug)."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database is unreachable or refusing connections" rather than
    "the database refused this statement": only the former is worth retrying later."""
    if isinstance(exc, DatabaseUnavailableError | OperationalError | InterfaceError):
        return True
    if isinstance(exc, PoolTimeoutError):  # every pooled connection is stuck on a dead server
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# -- records <-> JSON lines ---------------------------------------------------------------------


def record_to_line(record: CompletionRecord) -> bytes:
    data = asdict(record)
    data["created_at"] = record.created_at.isoformat()
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def record_from_dict(data: dict[str, Any]) -> CompletionRecord:
    # Fields this version does not know (a journal written by a newer one) are dropped rather
    # than making the whole record unreadable; missing ones take their defaults.
    known = {f.name for f in fields(CompletionRecord)}
    data = {k: v for k, v in data.items() if k in known}
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    choice_fields = {f.name for f in fields(ChoiceRecord)}
    data["choices"] = [
        ChoiceRecord(**{k: v for k, v in c.items() if k in choice_fields})
        for c in data.get("choices", [])
    ]
    return CompletionRecord(**data)


def read_segment(data: bytes, *, name: str = "") -> list[CompletionRecord]:
    """The records in a segment's bytes. The piece after the last newline is a torn append
    (never acknowledged) and is skipped; so is, with an error in the log, an unreadable line."""
    lines = data.split(b"\n")
    if lines[-1]:
        log.warning("event=journal_torn_line segment=%s bytes=%d", name, len(lines[-1]))
    records = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(record_from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            log.error(
                "event=journal_line_unreadable segment=%s line=%d error=%r", name, number, exc
            )
    return records


# -- the idempotent insert ----------------------------------------------------------------------


def save_new_completions(*, session: Session, records: Sequence[CompletionRecord]) -> int:
    """Insert the records whose id is not stored yet, in one transaction; returns how many were
    already there. Replaying a journal after a crash (or after another replica wrote the same
    records) therefore stores each record exactly once."""
    ids = [r.id for r in records]
    existing = set(session.scalars(select(Completion.id).where(Completion.id.in_(ids))))
    fresh = [r for r in records if r.id not in existing]
    if fresh:
        save_completions(session=session, records=fresh)
    return len(records) - len(fresh)


# -- segment files ------------------------------------------------------------------------------


class _Segment:
    def __init__(self, path: Path, fd: int, size: int, pending: set[str]) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.pending = pending  # ids appended here and not yet in the database


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only segments of records awaiting the database. Thread-safe: appends run in a
    worker thread while the database writer marks records committed from another."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 4 * 2**20,
        rotate_idle_bytes: int = 64 * 2**10,
    ) -> None:
        self.directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._rotate_idle_bytes = rotate_idle_bytes
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # oldest first; the last one takes appends
        self._where: dict[str, _Segment] = {}  # record id -> its segment
        self._opened = False

    # life cycle

    def open(self) -> list[CompletionRecord]:
        """Create the directory, take over the segments no live process holds, and return their
        records (to be written to the database again; they stay journaled until then)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        replay: list[CompletionRecord] = []
        with self._lock:
            for path in sorted(self.directory.glob(SEGMENT_GLOB)):
                adopted = self._adopt(path)
                if adopted is None:
                    continue
                segment, records = adopted
                fresh = [r for r in records if r.id not in self._where]
                for record in fresh:
                    segment.pending.add(record.id)
                    self._where[record.id] = segment
                replay += fresh
                if segment.pending:
                    self._segments.append(segment)
                else:
                    self._delete(segment)
            self._segments.append(self._new_segment())
            self._opened = True
        if replay:
            log.warning(
                "event=journal_replay dir=%s records=%d (acknowledged before a crash or an "
                "outage; written again, duplicates skipped)",
                self.directory,
                len(replay),
            )
        return replay

    def _adopt(self, path: Path) -> tuple[_Segment, list[CompletionRecord]] | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live server's segment
            return None
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)  # replaced since we opened it
        except FileNotFoundError:
            os.close(fd)  # its owner finished with it and deleted it meanwhile
            return None
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        return _Segment(path, fd, size, set()), read_segment(data, name=path.name)

    def _new_segment(self) -> _Segment:
        path = self.directory / f"records-{time.time_ns()}-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_dir(self.directory)  # the file itself must survive a crash, not just its bytes
        return _Segment(path, fd, 0, set())

    def _delete(self, segment: _Segment) -> None:
        # Unlink before unlocking: a replica waiting for the lock then finds the file gone.
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)

    def close(self) -> int:
        """Release the segments; those with records still awaiting the database stay on disk for
        the next start. Returns how many records stay journaled."""
        with self._lock:
            left = 0
            for segment in self._segments:
                left += len(segment.pending)
                if segment.pending:
                    os.close(segment.fd)
                else:
                    self._delete(segment)
            self._segments.clear()
            self._where.clear()
            self._opened = False
            return left

    # appends and commits

    def append(self, records: Iterable[CompletionRecord]) -> None:
        """Append and fsync; returns once the records would survive a crash. On a failed write
        the segment is cut back to its last whole line, so no later line is glued to a torn one,
        and the error is raised."""
        records = list(records)
        if not records:
            return
        data = b"".join(record_to_line(r) for r in records)
        with self._lock:
            if not self._opened:
                raise RuntimeError("the journal is not open")
            segment = self._segments[-1]
            try:
                written = 0
                while written < len(data):
                    written += os.write(segment.fd, data[written:])
                os.fsync(segment.fd)
            except OSError:
                os.ftruncate(segment.fd, segment.size)
                raise
            segment.size += len(data)
            for record in records:
                segment.pending.add(record.id)
                self._where[record.id] = segment
            if segment.size >= self._segment_bytes:
                self._segments.append(self._new_segment())

    def committed(self, ids: Iterable[str]) -> None:
        """The database has these records: forget them, and delete the segments left empty."""
        with self._lock:
            for record_id in ids:
                segment = self._where.pop(record_id, None)
                if segment is not None:
                    segment.pending.discard(record_id)
            current = self._segments[-1] if self._segments else None
            for segment in [s for s in self._segments[:-1] if not s.pending]:
                self._segments.remove(segment)
                self._delete(segment)
            # Caught up: start a fresh segment so an idle server keeps little to replay.
            if (
                current is not None
                and not current.pending
                and current.size >= self._rotate_idle_bytes
            ):
                self._segments.append(self._new_segment())
                self._segments.remove(current)
                self._delete(current)

    @property
    def pending(self) -> int:
        """Records journaled and not yet in the database."""
        with self._lock:
            return len(self._where)
