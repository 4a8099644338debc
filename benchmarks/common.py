"""Helpers shared by the benchmarks: percentiles, results files, subprocess servers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ------------------------------------------------------------------------------ results


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def write_results(name: str, payload: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``<results_dir>/<name>-<UTC timestamp>.json``; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{utc_stamp()}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------ processes


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess in its own session (so its engine children can be stopped with it),
    logging to a file; :meth:`stop` sends SIGTERM and waits, then SIGKILLs what is left."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(self.command)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command,
            env=dict(env),
            cwd=str(cwd),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by the server process itself ("api") and by
        its descendants (the engine core and its workers, "engine")."""
        import psutil

        def used(p: psutil.Process) -> float:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                return float(t.user + t.system)
            return 0.0

        try:
            main = psutil.Process(self.proc.pid)
            children = main.children(recursive=True)
        except psutil.Error:
            return {"api": 0.0, "engine": 0.0}
        return {"api": used(main), "engine": sum(used(c) for c in children)}

    def wait_ready(
        self,
        url: str,
        *,
        timeout: float,
        ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    ) -> float:
        """Poll ``url`` until ``ok``; returns the seconds it took. Raises if the process dies."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode} while starting; "
                        f"log: {self.log_path}\n{tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if ok(client.get(url)):
                        return time.monotonic() - self.started_at
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} was not ready after {timeout:.0f} s; log: {self.log_path}\n"
                        f"{tail(self.log_path)}"
                    )
                time.sleep(0.5)

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM the server, wait for it; SIGKILL its session if it or a child lingers."""
        pgid = self.proc.pid  # start_new_session: the session/group id is the child's pid
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            # Engine children normally exit with their parent; give them a moment, then insist.
            deadline = time.monotonic() + 15
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        finally:
            self._log.close()
        return self.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ runs


def kaizen_command() -> list[str]:
    script = Path(sys.executable).with_name("kaizen")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
