"""One training round at a time: the lock a round holds from its first record to its gate.

On SQLite (one host) it is an exclusive file lock, ``rounds_dir/.lock``; on PostgreSQL it is an
advisory lock in the database (:mod:`server.store.locks`), so trainer workers on different
hosts take turns too. Either way the lock goes when its holder dies, however it dies: the
kernel drops a dead process's file locks, the database a dead session's advisory locks.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sqlalchemy import Engine

from server.store.locks import LockBusyError, advisory_lock, supports_advisory_locks

__all__ = ["LOCK_FILE", "ROUND_LOCK_NAME", "RoundBusyError", "round_lock"]

LOCK_FILE = ".lock"
ROUND_LOCK_NAME = "kaizen.training_round"


class RoundBusyError(RuntimeError):
    """Another round holds the lock."""


@contextmanager
def round_lock(
    rounds_dir: Path, *, wait: bool = False, database: Engine | str | None = None
) -> Iterator[None]:
    """Hold the one-round-at-a-time lock; raises :class:`RoundBusyError` when it is taken and
    ``wait`` is false.

    With ``database`` on PostgreSQL the lock is the advisory lock :data:`ROUND_LOCK_NAME`;
    otherwise (SQLite, or no database given) the file lock in ``rounds_dir``."""
    if database is not None and supports_advisory_locks(database):
        with ExitStack() as stack:
            try:
                stack.enter_context(advisory_lock(database, ROUND_LOCK_NAME, wait=wait))
            except LockBusyError as exc:
                raise RoundBusyError(
                    "another training round is running (the database lock "
                    f"{ROUND_LOCK_NAME!r} is held)"
                ) from exc
            yield
        return
    rounds_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rounds_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise RoundBusyError(
                f"another training round is running (lock {rounds_dir / LOCK_FILE} is held)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
