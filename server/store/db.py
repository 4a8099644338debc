"""Database connection: engine and session factory, SQLite tuning, and the migration check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"


class DatabaseNotMigratedError(RuntimeError):
    """The database schema is missing or older than this code expects."""


def _private_sqlite_file(path: Path) -> None:
    """Create the database's directory (0700) and file (0600) for this user only, before SQLite
    does (it would take the umask, typically 0644 in a 0755 directory: readable by every local
    user, the trainer's sandboxed programs included where the sandbox has no filesystem view).
    SQLite gives its -wal and -shm files the database file's mode. Existing files are left as
    they are."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    os.chmod(path, 0o600)


# Seconds a PostgreSQL connection attempt may take (libpq's connect_timeout); a URL that sets
# ?connect_timeout=N keeps its own.
PG_CONNECT_TIMEOUT_S = 5


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, and its file (0600) and parent
    directories (0700) created for this user only."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database).expanduser())
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            # WAL lets readers (ops queries, the trainer) run while the server writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args: dict[str, object] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        # A database host that stops answering (rather than refusing) would otherwise hold
        # every connection attempt for the kernel's TCP timeout: minutes of hung requests.
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One session on a database engine of its own, for a short-lived command: the engine is
    disposed (its connections closed) when the block ends, however it ends."""
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def alembic_config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    # ConfigParser treats '%' as interpolation; URLs may contain it (escaped passwords).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``kaizen db upgrade``)."""
    from alembic import command

    make_engine(url).dispose()  # creates the SQLite directory if needed
    command.upgrade(alembic_config(url), revision)


def check_migrated(engine: Engine) -> None:
    """Raise :class:`DatabaseNotMigratedError` unless the schema is at the latest revision."""
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        state = "has no Kaizen schema" if current is None else f"is at revision {current}"
        raise DatabaseNotMigratedError(
            f"The database {engine.url.render_as_string(hide_password=True)} {state}, "
            f"this server needs revision {head}. Run `kaizen db upgrade` (or `make serve`, "
            "which does it) and start again."
        )


def dialect_insert(session: Session, table: Table) -> Any:
    """The dialect's INSERT, which offers ``on_conflict_do_nothing/update``."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"Kaizen supports SQLite and PostgreSQL, not {name}.")
