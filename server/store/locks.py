"""Locks in the database, for work that must run once across hosts (the trainer's rounds).

On PostgreSQL a lock is a session-level advisory lock (``pg_try_advisory_lock``) taken on a
connection of its own, opened for the lock and closed with it. The server releases it when that
session ends, however it ends: the holder releases it, its process dies (the kernel closes the
socket), or its host vanishes (the session's TCP keepalives, set below, give up after about
:data:`KEEPALIVE_DEAD_AFTER_S` seconds of silence). SQLite has no such thing: callers keep
their file lock there (:func:`supports_advisory_locks` tells them which).

A holder whose own connection to the database breaks has lost the lock without being told; a
round that outlives such an outage may overlap with a round another host started meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

# Server-side keepalives of the lock's session: idle 10 s, then 5 probes 5 s apart.
KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=5"
)
KEEPALIVE_DEAD_AFTER_S = 35


class LockBusyError(RuntimeError):
    """Somebody else holds the lock."""


def _url(bind: Engine | URL | str) -> URL:
    if isinstance(bind, Engine):
        return bind.url
    return make_url(bind) if isinstance(bind, str) else bind


def supports_advisory_locks(bind: Engine | URL | str) -> bool:
    return _url(bind).get_backend_name() == "postgresql"


def lock_key(name: str) -> int:
    """A lock's name as PostgreSQL's bigint key (signed 64 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(
    bind: Engine | URL | str, name: str, *, wait: bool = False, poll_seconds: float = 1.0
) -> Iterator[None]:
    """Hold the advisory lock ``name`` on PostgreSQL; :class:`LockBusyError` when another
    session holds it and ``wait`` is false (with ``wait``, retry every ``poll_seconds``)."""
    url = _url(bind)
    if not supports_advisory_locks(url):
        raise ValueError(f"advisory locks need PostgreSQL, not {url.get_backend_name()}")
    connect_args: dict[str, object] = {"options": KEEPALIVE_OPTIONS}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5
    engine = create_engine(
        url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=connect_args
    )
    key = lock_key(name)
    try:
        with engine.connect() as conn:
            while not conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
                if not wait:
                    raise LockBusyError(f"the database lock {name!r} is held by another session")
                time.sleep(poll_seconds)
            try:
                yield
            finally:
                # If the session is gone, the lock went with it.
                with contextlib.suppress(Exception):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def lock_holder(bind: Engine | URL | str, name: str) -> int | None:
    """The server process id of the session holding ``name`` (None when nobody does)."""
    engine = create_engine(_url(bind), poolclass=NullPool)
    unsigned = lock_key(name) & 0xFFFFFFFFFFFFFFFF  # PostgreSQL splits it in two oids
    try:
        with engine.connect() as conn:
            return conn.scalar(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            )
    finally:
        engine.dispose()
