"""Containment of a sandboxed program: host sockets, Kaizen's files, persistent writes.

The escape these tests pin down: a program reached PostgreSQL's Unix socket (world-writable
where Debian puts it, trust auth) and became a database superuser, read Kaizen's SQLite file,
and left a file in the system's lock directory. With the sandbox's filesystem view none of that
is reachable; without it (no mount namespace here) the tests skip after checking the warning,
and only the file modes of Kaizen's database keep the program out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

import trainer.sandbox as sandbox_module
from server.store.db import make_engine
from trainer.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(timeout_s=60.0, cpu_s=60)
REPO = Path(__file__).resolve().parents[2]
POSTGRES_SOCKET = "/var/run/postgresql/.s.PGSQL.5432"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


@pytest.fixture
def viewed(sandbox: Sandbox) -> Sandbox:
    if not sandbox.filesystem_isolated:
        pytest.skip("no mount namespace here: the sandbox has no filesystem view (warned)")
    return sandbox


@pytest.fixture
def listening_socket() -> Iterator[str]:
    """A Unix socket anyone may connect to, in a directory anyone may enter: a stand-in for
    PostgreSQL's on machines without one."""
    directory = tempfile.mkdtemp(prefix="kaizen-containment-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "listener.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen()
    yield path
    server.close()
    os.unlink(path)
    os.rmdir(directory)


def _host_unix_sockets() -> list[str]:
    """Every filesystem Unix socket the host's kernel knows of (/proc/net/unix), that exists."""
    paths = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                paths.add(fields[7])
    return sorted(p for p in paths if os.path.exists(p))


def _connects(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(3)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _run_json(sandbox: Sandbox, code: str) -> object:
    result = sandbox.run_python(code)
    assert result.status == "passed", result
    return json.loads(result.stdout.splitlines()[-1])


CONNECT_ALL = """
import json, socket, sys
out = {}
for path in json.loads(sys.stdin.read()):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    try:
        s.connect(path)
        out[path] = "connected"
    except OSError as e:
        out[path] = type(e).__name__
    finally:
        s.close()
print(json.dumps(out))
"""


def test_no_unix_socket_of_the_host_is_reachable(viewed: Sandbox, listening_socket: str) -> None:
    sockets = sorted({*_host_unix_sockets(), listening_socket})
    assert _connects(listening_socket)  # reachable from outside: the test means something
    result = viewed.run_python(CONNECT_ALL, stdin=json.dumps(sockets))
    assert result.status == "passed", result
    outcome = json.loads(result.stdout)
    assert set(outcome) == set(sockets)
    assert {path: why for path, why in outcome.items() if why == "connected"} == {}


def test_postgres_superuser_is_out_of_reach(viewed: Sandbox) -> None:
    if not os.path.exists(POSTGRES_SOCKET) or not _connects(POSTGRES_SOCKET):
        pytest.skip(f"no PostgreSQL listening at {POSTGRES_SOCKET} on this machine")
    code = f"""
import json, socket
out = {{}}
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({POSTGRES_SOCKET!r})
    out["raw"] = "connected"
except OSError as e:
    out["raw"] = type(e).__name__
try:
    import psycopg
except ImportError:
    out["psycopg"] = "not installed"
else:
    try:
        psycopg.connect("host=/var/run/postgresql user=postgres dbname=postgres",
                        connect_timeout=3).close()
        out["psycopg"] = "connected"
    except Exception as e:
        out["psycopg"] = type(e).__name__
print(json.dumps(out))
"""
    outcome = _run_json(viewed, code)
    assert isinstance(outcome, dict)
    assert outcome["raw"] == "FileNotFoundError"
    assert outcome["psycopg"] != "connected"


def test_abstract_namespace_socket_is_out_of_reach(sandbox: Sandbox) -> None:
    if not sandbox.network_isolated:
        pytest.skip("no network namespace here: abstract sockets are shared (warned)")
    name = f"\0kaizen-containment-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(name)
        server.listen()
        server.setblocking(False)
        assert _connects(name)  # reachable from outside
        server.accept()[0].close()
        result = sandbox.run_python(CONNECT_ALL, stdin=json.dumps([name]))
        assert result.status == "passed", result
        assert json.loads(result.stdout) == {name: "ConnectionRefusedError"}
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the listener


def test_kaizen_files_are_out_of_reach(
    viewed: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("kaizen-home")
    os.chmod(home, 0o755)  # even a traversable home: the view does not have it
    engine = make_engine(f"sqlite:///{home / 'kaizen.db'}")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE secrets (token TEXT)"))
        conn.execute(sqlalchemy.text("INSERT INTO secrets VALUES ('hunter2')"))
    engine.dispose()
    targets = [
        str(home / "kaizen.db"),
        str(REPO / "README.md"),
        str(REPO / "server" / "store" / "db.py"),
        str(REPO / "trainer" / "sandbox_harness.py"),
        str(Path.home() / ".kaizen" / "kaizen.db"),
        "/etc/shadow",
        "/var/lib/postgresql",
    ]
    code = """
import json, os, sys
out = {}
for path in json.loads(sys.stdin.read()):
    try:
        with open(path, "rb") as f:
            out[path] = "read %d bytes" % len(f.read())
    except OSError as e:
        out[path] = type(e).__name__
out["listing of /"] = sorted(os.listdir("/"))
print(json.dumps(out))
"""
    result = viewed.run_python(code, stdin=json.dumps(targets))
    assert result.status == "passed", result
    outcome = json.loads(result.stdout)
    assert {p: outcome[p] for p in targets if not outcome[p].endswith("Error")} == {}
    assert {p: outcome[p] for p in targets} == {p: "FileNotFoundError" for p in targets}
    # The view's root: system directories, the interpreter's and nothing of the host's data.
    listing = set(outcome["listing of /"])
    assert listing.isdisjoint({"var", "home", "srv", "opt", "mnt", "boot", "farm", "old_root"})
    assert {"usr", "tmp", "proc", "dev", "etc", "run"} <= listing


WRITE_EVERYWHERE = """
import json, os, sys
name = sys.stdin.read().strip()
written, seen = [], 0
def visit(path, depth):
    global seen
    seen += 1
    try:
        st = os.statvfs(path)
    except OSError:
        return
    if st.f_flag & os.ST_RDONLY and path != "/":
        return  # a read-only mount (/usr, the interpreter's): nothing below can be written
    target = os.path.join(path, name)
    try:
        with open(target, "w") as f:
            f.write("x")
        written.append(target)
    except OSError:
        pass
    if depth == 0:
        return
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and entry.path not in ("/proc", "/sys"):
            visit(entry.path, depth - 1)
visit("/", 6)
for path in ["/run/lock", "/var/lock", "/var/tmp", "/tmp", "/dev/shm", "/run"]:
    if os.path.isdir(path):
        visit(path, 0)
print(json.dumps({"written": sorted(set(written)), "seen": seen}))
"""


def test_nothing_written_anywhere_persists(viewed: Sandbox) -> None:
    name = f"kaizen-persist-{uuid.uuid4().hex}"
    result = viewed.run_python(WRITE_EVERYWHERE, stdin=name)
    assert result.status == "passed", result
    outcome = json.loads(result.stdout)
    written = outcome["written"]
    assert outcome["seen"] > 5
    assert any(p.startswith("/tmp/") for p in written)  # its private /tmp is writable
    assert all(not p.startswith(("/usr/", "/etc/", "/run/lock/")) for p in written), written
    survivors = [p for p in written if os.path.exists(p)]
    assert survivors == []
    # And nothing of that name anywhere the host keeps run-time or temporary files.
    for base in ["/run/lock", "/var/lock", "/var/tmp", "/tmp", "/dev/shm", "/run"]:
        assert not os.path.exists(os.path.join(base, name)), base


def test_database_files_are_created_private(tmp_path: Path) -> None:
    db = tmp_path / "home" / "kaizen.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir()}
    engine.dispose()
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert modes["kaizen.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_without_the_view_file_modes_keep_the_database_private(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the sandbox has no view (it warns), a program runs as some local user: the
    database must be unreadable to any user but Kaizen's."""
    monkeypatch.setattr(sandbox_module, "_TRY_NAMESPACES", False)
    with caplog.at_level(logging.WARNING, logger="trainer.sandbox"):
        fallback = Sandbox(LIMITS)
    assert not fallback.filesystem_isolated
    assert "sandbox: no network isolation on this machine" in caplog.text
    if os.geteuid() != 0:
        pytest.skip("needs root to read the file as another user")
    home = Path(tempfile.mkdtemp(prefix="kaizen-home-"))
    try:
        os.chmod(home, 0o755)  # a traversable home: only the modes below protect the file
        db = home / "data" / "kaizen.db"
        make_engine(f"sqlite:///{db}").dispose()
        other = subprocess.run(
            ["/bin/cat", str(db)], user=65534, group=65534, capture_output=True, text=True
        )
        assert other.returncode != 0
        assert "Permission denied" in other.stderr
    finally:
        shutil.rmtree(home)


def test_an_interpreter_under_tmp_keeps_the_filesystem_view(
    viewed: Sandbox, tmp_path: Path
) -> None:
    """A checkout under /tmp (as a CI job may make one) has its venv there: the view's private
    /tmp once hid it, the probe fell back to running programs as root with no namespaces, and
    the sandbox tests skipped instead of failing."""
    import sys

    assert str(tmp_path).startswith("/tmp/")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    under_tmp = Sandbox(LIMITS, python=str(venv / "bin" / "python"))
    assert under_tmp.filesystem_isolated and under_tmp.network_isolated
    assert under_tmp.run_uids == viewed.run_uids
    result = under_tmp.run_test("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n")
    assert result.passed, result
    seen = under_tmp.run_python(f"import os\nprint(os.path.exists({str(REPO / 'README.md')!r}))\n")
    assert seen.stdout.strip() == "False", seen
