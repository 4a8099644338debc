"""`kaizen serve` as a real process: SIGTERM lets streams in flight finish, and every response
already sent has its record in the database when the process exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from server.store.db import make_engine, make_session_factory, upgrade
from server.store.models import Completion
from server.store.tokens import Role, create_token
from tests.integration.conftest import TinyWorld

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_streams_and_records(tiny_world: TinyWorld, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'kaizen.db'}"
    upgrade(db_url)
    db = make_engine(db_url)
    with make_session_factory(db)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
    port = _free_port()
    env = {
        **os.environ,
        "KAIZEN_HOME": str(tmp_path),
        "KAIZEN_DATABASE_URL": db_url,
        "KAIZEN_MODEL": str(tiny_world.model_dir),
        "KAIZEN_SERVED_MODEL_NAME": "tiny",
        "KAIZEN_PORT": str(port),
        "KAIZEN_MAX_MODEL_LEN": "512",
        "KAIZEN_KV_CACHE_GIB": "0.0625",
        "KAIZEN_ENFORCE_EAGER": "true",
        "KAIZEN_MAX_TOKENS_LIMIT": "256",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaizen", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)

        started = threading.Barrier(5)
        results: list[tuple[str, int, bool]] = []

        def stream(i: int) -> None:
            body = {
                "model": "tiny",
                "prompt": f"def f{i}():",
                "max_tokens": 256,
                "stream": True,
                "temperature": 0,
                "stream_options": {"include_usage": True},
            }
            completion_id, tokens, done, waited = "", 0, False, False
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                json=body,
                timeout=60,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        completion_id = chunk["id"]
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if not waited:
                            waited = True
                            started.wait(30)
                    done = done or line == "data: [DONE]"
            results.append((completion_id, tokens, done))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        started.wait(60)  # every stream has its first chunk
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(90)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.wait(90) in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()

    assert len(results) == 4
    assert all(done and tokens == 256 for _, tokens, done in results), results
    with make_session_factory(db)() as session:
        rows = {r.id: (r.status, r.completion_tokens) for r in session.scalars(select(Completion))}
    db.dispose()
    assert rows == {cid: ("completed", 256) for cid, _, _ in results}
    assert "event=recorder_stopped written=4" in log_path.read_text()


@pytest.mark.postgres
def test_sigterm_during_a_database_outage_exits_and_the_next_start_writes_the_records(
    tiny_world: TinyWorld, tmp_path: Path
) -> None:
    """It used to block until the database came back, so a supervisor's stop timeout (kill -9)
    lost every answered record. Now it waits KAIZEN_RECORDER_DRAIN_SECONDS, leaves the records
    in the journal and exits; the next start writes them, once."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tests.integration.conftest import start_server_process
    from tests.server.store.test_postgres import ADMIN_URL, _deny_connections

    name = f"kaizen_test_{os.getpid()}_{int(time.time())}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is not reachable: {exc}")
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        upgrade(url)
        db = make_engine(url)
        with make_session_factory(db)() as session:
            _, secret = create_token(session=session, name="ide", role=Role.IDE)
        db.dispose()
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": "tiny", "prompt": "def f0():", "max_tokens": 8, "temperature": 0}
        server = start_server_process(tiny_world, tmp_path, url, KAIZEN_RECORDER_DRAIN_SECONDS="2")
        server.wait_ready()
        first = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
        assert first.status_code == 200, first.text
        ids = [first.json()["id"]]
        _deny_connections(name, True)
        for _ in range(3):
            r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
            assert r.status_code == 200, r.text  # the token was verified before the outage
            ids.append(r.json()["id"])
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) in (0, -signal.SIGTERM), server.log()[-3000:]
        log = server.log()
        assert "event=recorder_drain_timeout" in log and "left_in_journal=" in log, log[-3000:]
        assert list((tmp_path / "journal").glob("records-*.jsonl"))

        _deny_connections(name, False)
        server = start_server_process(tiny_world, tmp_path, url, log_name="second.log")
        server.wait_ready()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(120)
        assert "event=journal_replay" in server.log()
        db = make_engine(url)
        with make_session_factory(db)() as session:
            stored = set(session.scalars(select(Completion.id)))
        db.dispose()
        assert stored == set(ids)
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.kill()
        _deny_connections(name, False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
