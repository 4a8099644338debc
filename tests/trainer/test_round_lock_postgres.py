"""One round at a time across hosts: two trainer worker processes on one PostgreSQL database,
each with its own rounds directory (no shared disk, so no file lock can help), never run rounds
at once; a holder killed with SIGKILL releases the lock to the other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.store.db import upgrade
from server.store.locks import LockBusyError, advisory_lock, lock_holder
from tests.utils.postgres import pg_database
from trainer.lock import ROUND_LOCK_NAME, RoundBusyError, round_lock

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        upgrade(url)
        yield url


def start_worker(url: str, log: Path, rounds_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.utils.lock_worker", url, str(log), str(rounds_dir), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def read_log(log: Path) -> list[tuple[int, str, int]]:
    if not log.exists():
        return []
    return [
        (int(pid), what, int(ns))
        for pid, what, ns in (line.split() for line in log.read_text().splitlines())
    ]


def test_two_worker_processes_never_hold_the_round_lock_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "rounds.log"
    workers = [
        start_worker(pg_url, log, tmp_path / f"host-{i}" / "rounds", "--rounds", "3")
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err.decode()[-2000:]
    events = read_log(log)
    rounds = [(pid, what, ns) for pid, what, ns in events if what in ("start", "end")]
    assert len(rounds) == 12  # 3 rounds each, started and ended
    assert {pid for pid, _, _ in rounds} == {w.pid for w in workers}
    rounds.sort(key=lambda e: e[2])
    # In time order, every start is followed by the end of that same worker's round: no
    # second round ever started while one was running.
    for (pid_a, what_a, _), (pid_b, what_b, _) in zip(rounds[::2], rounds[1::2], strict=True):
        assert (what_a, what_b) == ("start", "end") and pid_a == pid_b, rounds
    assert any(what == "busy" for _, what, _ in events)  # they did contend
    assert not (tmp_path / "host-0" / "rounds" / ".lock").exists()  # not the file lock


def test_a_killed_holder_releases_the_lock(pg_url: str, tmp_path: Path) -> None:
    log = tmp_path / "rounds.log"
    holder = start_worker(pg_url, log, tmp_path / "a", "--rounds", "1", "--hold", "600")
    try:
        deadline = time.monotonic() + 120
        while not any(what == "start" for _, what, _ in read_log(log)):
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the first worker never started its round"
            time.sleep(0.1)
        assert lock_holder(pg_url, ROUND_LOCK_NAME) is not None
        with pytest.raises(RoundBusyError), round_lock(tmp_path / "b", database=pg_url):
            pass
        waiter = start_worker(pg_url, log, tmp_path / "c", "--rounds", "1", "--hold", "0.1")
        time.sleep(2.0)
        assert not any(pid == waiter.pid and what == "start" for pid, what, _ in read_log(log))

        killed_at = time.monotonic_ns()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        _, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err.decode()[-2000:]
        started = [ns for pid, what, ns in read_log(log) if pid == waiter.pid and what == "start"]
        assert len(started) == 1 and started[0] > killed_at
        assert (started[0] - killed_at) / 1e9 < 30  # the database noticed at once
        assert lock_holder(pg_url, ROUND_LOCK_NAME) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_lock_is_not_reentrant_across_sessions_and_is_released(pg_url: str) -> None:
    with advisory_lock(pg_url, "kaizen.test"):
        with pytest.raises(LockBusyError), advisory_lock(pg_url, "kaizen.test"):
            pass
        with advisory_lock(pg_url, "kaizen.other"):  # another name, another lock
            pass
    with advisory_lock(pg_url, "kaizen.test"):
        pass
    assert lock_holder(pg_url, "kaizen.test") is None
