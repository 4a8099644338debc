"""The one executor for untrusted code in Kaizen: model-generated programs run against tests.

Preference pairs and evaluation benchmarks (MBPP+, HumanEval) both run code the model wrote;
everything of that kind goes through :class:`Sandbox`, never through ``subprocess`` directly.

Each run gets:

* a fresh private directory (mode 0700) holding ``main.py`` and any extra files; it is the
  working directory, ``HOME`` and ``TMPDIR``, and is deleted afterwards;
* a minimal environment (``PATH``, ``HOME``, ``LANG``, ...): nothing of the caller's
  (``KAIZEN_*``, tokens) is inherited, and the interpreter runs with ``-E -s`` (no ``PYTHON*``
  variables, no user site; the venv's site-packages stay importable, so tests may use numpy);
* resource limits (:class:`SandboxLimits`): CPU seconds, address space, processes, file size,
  no core files; a wall-clock timeout and an output cap enforced by the caller's side;
* when running as root, a dedicated unprivileged uid per concurrent run (``run_uids``, taken
  from a small pool and leased with a file lock, so runs never share a uid): it makes
  ``RLIMIT_NPROC`` bite (fork bombs), keeps the program out of everything it does not own,
  and lets the supervisor kill every process of the run, wherever it went;
* where the kernel allows it (root, or an unprivileged user namespace): private network, mount
  and PID namespaces. The network namespace has only its own loopback, so nothing on the
  machine or beyond is reachable; the PID namespace dies with its first process, taking
  every process of the run with it. Whether this works is probed once per ``Sandbox``; if not,
  a WARNING is logged ("sandbox: no network isolation on this machine: ...") and
  ``network_isolated`` is False.

The program runs under a small supervisor (``python -I -S -c``, see ``_SUPERVISOR``) that sets
up the namespaces, forks the program with its limits and reports its exit status and resource
usage over a pipe; the caller's side reads the output with caps, enforces the wall clock, and
asks the supervisor to kill everything (SIGTERM to it) on a timeout or an oversized output.
No ``preexec_fn`` is used, so runs may start from many threads at once (``run_many``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import pwd
import re
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from tqdm import tqdm

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "Status", "check_program"]

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "memory", "output_limit", "killed", "error"]

MiB = 1024 * 1024

# Unshare flags (linux/sched.h).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

# The uids runs drop to when the caller is root: one per concurrent run, none with a passwd
# entry (Debian's 60000-64999 range is for rare system allocations; these are unlikely taken).
_UID_BASE = 62000
_UID_COUNT = 64
# Tests switch this off to exercise the fallback without namespaces.
_TRY_NAMESPACES = True

# After asking the supervisor to stop, how long before everything is SIGKILLed from here.
_KILL_GRACE_S = 3.0
_READ_CHUNK = 65536
_TRUNCATION_MARKER = "\n[kaizen sandbox: output truncated at {limit} bytes]\n"
# World-writable places a run may leave files in; scrubbed of the run uid's files afterwards.
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

_MEMORY_LAST_LINE = re.compile(r"^[\w.]*MemoryError\b")
_MEMORY_ANYWHERE = re.compile(r"Cannot allocate memory|std::bad_alloc|[Oo]ut of memory")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Sizes are in bytes; ``memory_bytes`` bounds the address space."""

    timeout_s: float = 10.0  # wall clock, from start to finish, enforced by the caller
    cpu_s: int = 10  # RLIMIT_CPU: SIGXCPU at this many CPU seconds, SIGKILL one later
    memory_bytes: int = 1024 * MiB  # RLIMIT_AS
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_output_bytes: int = 1 * MiB  # per stream (stdout, stderr)
    max_file_size_bytes: int = 16 * MiB  # RLIMIT_FSIZE

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float):
            raise TypeError(f"timeout_s must be a number, not {self.timeout_s!r}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds: {self.timeout_s}")
        minimum = {
            "cpu_s": 1,
            "memory_bytes": 32 * MiB,  # the interpreter itself needs about 20 MiB
            "max_processes": 1,
            "max_output_bytes": 1,
            "max_file_size_bytes": 1,
        }
        for name, least in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {value!r}")
            if value < least:
                raise ValueError(f"{name} must be at least {least}: {value}")


@dataclass
class RunResult:
    """The outcome of one run.

    ``exit_code`` is the program's exit status, negative (``-N``) when signal N ended it, and
    None when it never ran, or when the sandbox stopped it (timeout, output limit) before its
    status was known. ``stdout``/``stderr`` are capped at ``max_output_bytes`` each, with a
    marker line appended where they were cut.
    """

    status: Status
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Mode:
    """How runs are isolated on this machine; chosen by the probe in ``Sandbox.__init__``."""

    unshare: int  # _CLONE_* flags the supervisor unshares
    drop_uid: bool  # run as a pooled unprivileged uid (caller is root)
    kill: Literal["ns", "uid", "pgrp"]  # how the rest of a run is killed
    name: str


@dataclass
class _Capture:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk`` up to the limit; True when the limit was exceeded."""
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.data += chunk[: max(room, 0)]
            self.truncated = True
            return True
        self.data += chunk
        return False

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        if self.truncated:
            out += _TRUNCATION_MARKER.format(limit=self.limit)
        return out


class Sandbox:
    """Runs untrusted Python programs in isolation (see the module docstring).

    ``network_isolated``: runs get a private network namespace (only their own loopback).
    ``pid_isolated``: runs get a private PID namespace (every process dies with the run).
    ``run_uids``: the uids runs execute as, or None when they run as the caller's own user.
    """

    network_isolated: bool
    pid_isolated: bool
    run_uids: range | None

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),  # noqa: B008 - frozen, so a shared default is fine
        *,
        workers: int = 2,
        python: str = sys.executable,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int: {workers!r}")
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"python is not an executable file: {python!r}")
        self.limits = limits
        self.workers = workers
        self.python = python
        self._root = os.geteuid() == 0
        self._base_dir = tempfile.gettempdir()
        self._uid_pool: list[int] = []
        self._lock_dir = ""
        self._next_uid = 0
        self._uid_lock = threading.Lock()
        self._exposures: list[tuple[str, list[str]]] = []
        if self._root:
            self._uid_pool = [uid for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT) if _free(uid)]
            if not self._uid_pool:
                raise RuntimeError(f"sandbox: every uid in {_UID_BASE}+{_UID_COUNT} is taken")
            self._lock_dir = _private_dir(
                os.path.join(self._base_dir, f"kaizen-sandbox-uids-{os.geteuid()}")
            )
            self._exposures = self._find_exposures()
        self._mode = self._probe()
        self.network_isolated = bool(self._mode.unshare & _CLONE_NEWNET)
        self.pid_isolated = bool(self._mode.unshare & _CLONE_NEWPID)
        self.run_uids = range(_UID_BASE, _UID_BASE + _UID_COUNT) if self._mode.drop_uid else None

    # -- public API ---------------------------------------------------------------------------

    def run_python(
        self, code: str, *, files: dict[str, str] | None = None, stdin: str = ""
    ) -> RunResult:
        """Write ``code`` to main.py (and ``files`` beside it) in a fresh private directory and
        run it there under the limits. Never raises for anything the program does."""
        extra = _check_files(files or {})
        return self._run(code, extra, stdin, self._mode, self.limits)

    def run_many(self, programs: Sequence[str], *, progress: bool = False) -> list[RunResult]:
        """Run each program (as ``run_python``) on ``workers`` threads; results in input order."""
        results: list[RunResult | None] = [None] * len(programs)
        with (
            ThreadPoolExecutor(max_workers=self.workers) as pool,
            tqdm(total=len(programs), desc="sandbox", unit="run", disable=not progress) as bar,
        ):
            futures = {pool.submit(self.run_python, code): i for i, code in enumerate(programs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return [r for r in results if r is not None]

    # -- probing ------------------------------------------------------------------------------

    def _candidates(self) -> list[_Mode]:
        ns = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC
        modes = []
        if self._root:
            if _TRY_NAMESPACES:
                modes.append(
                    _Mode(ns, True, "ns", "namespaces (net, mount, pid, ipc) + private uid")
                )
            modes.append(_Mode(0, True, "uid", "private uid, no namespaces"))
            modes.append(_Mode(0, False, "pgrp", "as root: no privilege drop, no namespaces"))
        else:
            if _TRY_NAMESPACES:
                modes.append(
                    _Mode(ns | _CLONE_NEWUSER, False, "ns", "user namespace (net, mount, pid, ipc)")
                )
            modes.append(_Mode(0, False, "pgrp", "caller's user, no namespaces"))
        return modes

    def _probe(self) -> _Mode:
        """Try the isolation modes, strongest first, with a tiny program; keep the first that
        works and log loudly what is missing."""
        limits = SandboxLimits(timeout_s=30.0)
        failures: list[str] = []
        net_failure = "namespaces not tried"
        for mode in self._candidates():
            result = self._run("import os\nprint(os.getuid())\n", {}, "", mode, limits)
            if result.status == "passed" and result.stdout.strip().isdigit():
                break
            why = result.reason if result.status != "passed" else f"unexpected {result.stdout!r}"
            failures.append(f"{mode.name}: {why}")
            if mode.unshare & _CLONE_NEWNET and net_failure == "namespaces not tried":
                net_failure = why
        else:
            raise RuntimeError("sandbox: no way to run programs here: " + "; ".join(failures))
        if not mode.unshare & _CLONE_NEWNET:
            log.warning("sandbox: no network isolation on this machine: %s", net_failure)
        if self._root and not mode.drop_uid:
            log.warning(
                "sandbox: untrusted code will run as root (no privilege drop): %s",
                "; ".join(failures),
            )
        if mode.kill == "pgrp":
            log.warning(
                "sandbox: processes a program moves out of its process group can outlive the "
                "run, and RLIMIT_NPROC counts all processes of this user"
            )
        log.info("sandbox: isolation on this machine: %s", mode.name)
        return mode

    def _find_exposures(self) -> list[tuple[str, list[str]]]:
        """The interpreter's directories the run uid cannot reach (e.g. a pyenv under /root,
        mode 0700), grouped by the topmost blocking directory. In a private mount namespace the
        supervisor hides that directory under an empty tmpfs and binds just these back."""
        query = (
            "import json, os, sys; print(json.dumps([sys.base_prefix, sys.prefix,"
            " os.path.dirname(os.path.realpath(sys.executable))] + sys.path))"
        )
        try:
            out = subprocess.run(
                [self.python, "-E", "-s", "-c", query],
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                check=True,
            ).stdout
            paths = [p for p in json.loads(out) if isinstance(p, str) and os.path.isabs(p)]
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.warning("sandbox: could not ask %s for its paths: %s", self.python, e)
            return []
        paths.append(os.path.dirname(os.path.realpath(self.python)))
        targets = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
        targets = [p for p in targets if not any(_within(p, q) for q in targets if q != p)]
        groups: dict[str, list[str]] = {}
        for target in targets:
            blocker = _topmost_blocker(target)
            if blocker is not None:
                groups.setdefault(blocker, []).append(target)
        return sorted(groups.items())

    # -- one run ------------------------------------------------------------------------------

    def _run(
        self, code: str, files: dict[str, str], stdin: str, mode: _Mode, limits: SandboxLimits
    ) -> RunResult:
        start = time.monotonic()
        uid: int | None = None
        lock_fd = -1
        workdir = ""
        try:
            if mode.drop_uid:
                uid, lock_fd = self._lease_uid()
            workdir = tempfile.mkdtemp(prefix="kaizen-sandbox-", dir=self._base_dir)
            _write_files(workdir, {"main.py": code, **files}, uid)
            return self._execute(workdir, stdin, mode, limits, uid)
        except OSError as e:
            return RunResult("error", None, "", "", time.monotonic() - start, f"sandbox: {e}")
        finally:
            if workdir:
                _remove_tree(workdir)
            if uid is not None:
                _scrub_shared_tmp(uid)
            if lock_fd >= 0:
                os.close(lock_fd)  # releases the flock

    def _lease_uid(self) -> tuple[int, int]:
        """An unused uid from the pool, held by an exclusive flock (across processes too)."""
        while True:
            with self._uid_lock:
                first = self._next_uid
                self._next_uid = (first + 1) % len(self._uid_pool)
            for i in range(len(self._uid_pool)):
                uid = self._uid_pool[(first + i) % len(self._uid_pool)]
                path = os.path.join(self._lock_dir, f"{uid}.lock")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return uid, fd
            time.sleep(0.05)

    def _execute(
        self,
        workdir: str,
        stdin: str,
        mode: _Mode,
        limits: SandboxLimits,
        uid: int | None,
    ) -> RunResult:
        nproc = limits.max_processes
        if mode.kill == "pgrp" and not self._root:
            # RLIMIT_NPROC counts every task of this user; leave room for the ones running now.
            nproc += _task_count(os.getuid())
        rlimits = [
            (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),
            (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_FSIZE, limits.max_file_size_bytes, limits.max_file_size_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        report_r, report_w = os.pipe()
        config = {
            "report_fd": report_w,
            "unshare": mode.unshare,
            "exposures": self._exposures if mode.unshare & _CLONE_NEWNS else [],
            "kill": mode.kill,
            "uid": uid,
            "rlimits": rlimits,
            "argv": [self.python, "-E", "-s", "-B", "-X", "utf8", "main.py"],
        }
        env = {
            "PATH": f"{os.path.dirname(self.python)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "USER": "sandbox",
            "LOGNAME": "sandbox",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",
        }
        start = time.monotonic()  # the wall clock runs from here, not from waiting for a uid
        try:
            proc = subprocess.Popen(
                [self.python, "-I", "-S", "-c", _SUPERVISOR, json.dumps(config)],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_w,),
                start_new_session=True,
            )
        except OSError:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        with proc:
            outcome = _communicate(proc, report_r, stdin.encode(), limits, start)
        outcome.duration_s = time.monotonic() - start
        return _classify(outcome, limits)


def check_program(code: str, test: str, *, sandbox: Sandbox) -> RunResult:
    """Run ``code`` followed by ``test`` (asserts): passed when every assert holds."""
    return sandbox.run_python(code + "\n\n" + test)


# -- the caller's side of a run ---------------------------------------------------------------


@dataclass
class _Outcome:
    stdout: _Capture
    stderr: _Capture
    reports: list[dict[str, object]]
    returncode: int | None  # the supervisor's
    stopped: str | None  # why we stopped the run: "timeout", "output_limit:<stream>", None
    duration_s: float = 0.0


def _communicate(
    proc: subprocess.Popen[bytes], report_r: int, data: bytes, limits: SandboxLimits, start: float
) -> _Outcome:
    """Feed stdin, read stdout/stderr (capped) and the supervisor's reports until all close;
    stop the run at the wall-clock deadline or when an output exceeds its cap."""
    assert proc.stdout is not None and proc.stderr is not None
    captures = {
        "stdout": _Capture(limits.max_output_bytes),
        "stderr": _Capture(limits.max_output_bytes),
    }
    report_buf = bytearray()
    stopped: str | None = None
    stop_deadline = math.inf
    deadline = start + limits.timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(report_r, selectors.EVENT_READ, "report")
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    view = memoryview(data)

    def stop(why: str) -> None:
        nonlocal stopped, stop_deadline
        if stopped is None:
            stopped = why
            stop_deadline = time.monotonic() + _KILL_GRACE_S
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)  # the supervisor kills the whole run

    try:
        while sel.get_map():
            now = time.monotonic()
            if stopped is None and now >= deadline:
                stop("timeout")
            if now >= stop_deadline + _KILL_GRACE_S:
                break  # something holds our pipes open and cannot be killed; give up on it
            if now >= stop_deadline:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            wait = (deadline if stopped is None else stop_deadline) - now
            if now >= stop_deadline:
                wait = stop_deadline + _KILL_GRACE_S - now
            for key, _ in sel.select(max(wait, 0.0)):
                fd, name = key.fd, key.data
                if name == "stdin":
                    try:
                        view = view[os.write(fd, view[:_READ_CHUNK]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed stdin or is gone
                        view = view[:0]
                    if not view:
                        sel.unregister(fd)
                        assert proc.stdin is not None
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                    continue
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    sel.unregister(fd)
                elif name == "report":
                    report_buf += chunk
                elif captures[name].add(chunk):
                    stop(f"output_limit:{name}")
    finally:
        sel.close()
        os.close(report_r)
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    try:
        returncode: int | None = proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            returncode = proc.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            returncode = None
    reports = []
    for line in report_buf.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict):
                reports.append(message)
    return _Outcome(captures["stdout"], captures["stderr"], reports, returncode, stopped)


def _classify(outcome: _Outcome, limits: SandboxLimits) -> RunResult:
    stdout, stderr = outcome.stdout.text(), outcome.stderr.text()

    def result(status: Status, code: int | None, reason: str) -> RunResult:
        return RunResult(status, code, stdout, stderr, outcome.duration_s, reason)

    memory = f"memory limit {_size(limits.memory_bytes)}"
    exits = [r for r in outcome.reports if "exit" in r]
    errors = [str(r["error"]) for r in outcome.reports if "error" in r]
    code: int | None = None
    cpu = 0.0
    if exits and isinstance(exits[-1]["exit"], int):
        code = os.waitstatus_to_exitcode(exits[-1]["exit"])
        cpu = float(exits[-1].get("cpu", 0.0))  # type: ignore[arg-type]

    if outcome.stopped == "timeout":
        return result("timeout", code, f"wall-clock timeout after {limits.timeout_s:g} s")
    if outcome.stopped is not None:
        stream = outcome.stopped.split(":", 1)[1]
        limit = _size(limits.max_output_bytes)
        return result("output_limit", code, f"exceeded output limit of {limit} on {stream}")
    if errors:
        return result("error", None, "sandbox setup failed: " + "; ".join(errors))
    if code is None:
        return result("error", None, f"sandbox supervisor ended with {outcome.returncode}")
    lines = [line for line in outcome.stderr.data.decode(errors="replace").splitlines() if line]
    out_of_memory = bool(lines and _MEMORY_LAST_LINE.match(lines[-1])) or bool(
        _MEMORY_ANYWHERE.search(stderr)
    )
    if code == 0:
        return result("passed", 0, "exit code 0")
    if code > 0:
        if out_of_memory:
            return result("memory", code, f"MemoryError ({memory})")
        return result("failed", code, f"exit code {code}")
    signum = -code
    name = _signal_name(signum)
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu >= limits.cpu_s):
        return result("timeout", code, f"CPU time limit of {limits.cpu_s} s exceeded ({name})")
    rss = int(exits[-1].get("maxrss_kib", 0)) * 1024  # type: ignore[call-overload]
    if out_of_memory or (signum == signal.SIGKILL and rss >= limits.memory_bytes // 2):
        # Nothing here SIGKILLs a program it did not stop; a big one: the kernel's OOM killer.
        return result("memory", code, f"killed by {name} ({memory})")
    return result("killed", code, f"killed by {name}")


# -- helpers ----------------------------------------------------------------------------------


def _size(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} bytes"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _free(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _topmost_blocker(path: str) -> str | None:
    """The highest directory above ``path`` that others may not enter, if any."""
    parts = PurePosixPath(path).parts
    for i in range(1, len(parts)):
        ancestor = str(PurePosixPath(*parts[:i]))
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _private_dir(path: str) -> str:
    """Create (or reuse) a directory only this user can use; refuse one anyone else made."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"sandbox: {path} is not a private directory of this user")
    return path


def _check_files(files: dict[str, str]) -> dict[str, str]:
    for name in files:
        parts = PurePosixPath(name).parts
        if (
            not name
            or "\0" in name
            or PurePosixPath(name).is_absolute()
            or any(p in ("..", ".") for p in parts)
            or name.split("/")[0] == "main.py"
        ):
            raise ValueError(f"bad file name for the sandbox: {name!r}")
    return dict(files)


def _write_files(workdir: str, files: dict[str, str], uid: int | None) -> None:
    for name, text in files.items():
        path = os.path.join(workdir, *PurePosixPath(name).parts)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(workdir):
            os.chown(dirpath, uid, uid)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _remove_tree(path: str) -> None:
    """Delete a run's directory even where the program took permissions away."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _restore_permissions(path)
        shutil.rmtree(path, ignore_errors=True)


def _restore_permissions(path: str) -> None:
    """Make every directory under ``path`` ours to list and empty again (never via a link)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return
        os.chmod(path, 0o700)
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _restore_permissions(entry.path)


def _scrub_shared_tmp(uid: int) -> None:
    """Remove what the run's uid left in world-writable temp directories (top level)."""
    for base in _SHARED_TMP_DIRS:
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    _remove_tree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _task_count(uid: int) -> int:
    """How many tasks (threads included) this uid runs now, as RLIMIT_NPROC counts them."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


# -- the supervisor ---------------------------------------------------------------------------
#
# Runs as `python -I -S -c _SUPERVISOR CONFIG` in the run's directory, a new session, with the
# run's environment. As the caller's user (root: still privileged) it unshares the namespaces,
# hides what the run uid must not see and binds back what the interpreter needs, brings up the
# private loopback, then forks the program: limits, no new privileges, the run uid, exec.
# With a PID namespace it forks twice: the middle process is PID 1 there, reaps, and its exit
# kills every process left in the namespace. Without one it is a child subreaper and kills the
# rest by uid (kill(-1) as that uid) or process group. It reports JSON lines on report_fd:
# {"error": ...} when setup or exec fail, {"exit": wait status, "cpu": s, "maxrss_kib": n}.
# SIGTERM from the caller: kill everything now.
_SUPERVISOR = r"""
import ctypes, json, os, signal, sys, time

cfg = json.loads(sys.argv[1])
REPORT = cfg["report_fd"]
os.set_inheritable(REPORT, False)
state = {"role": "outer", "child": 0, "stopping": False}
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]

def report(**msg):
    try:
        os.write(REPORT, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount " + dst)

def kill_rest():
    if state["role"] == "outer" and state["child"]:
        try:
            os.kill(state["child"], signal.SIGKILL)
        except OSError:
            pass
    elif state["role"] == "supervisor" and state["child"]:
        if cfg["kill"] == "uid":
            pid = os.fork()
            if pid == 0:
                try:
                    uid = cfg["uid"]
                    os.setgroups([])
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                    for _ in range(3):
                        try:
                            os.kill(-1, signal.SIGKILL)
                        except ProcessLookupError:
                            break
                finally:
                    os._exit(0)
        else:
            for pid in [state["child"]] + direct_children():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

def direct_children():
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
                    found.append(int(name))
            except (OSError, ValueError):
                pass
    return found

def on_term(signum, frame):
    state["stopping"] = True
    kill_rest()

def detach_stdio():
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

def setup():
    flags = cfg["unshare"]
    if not flags:
        return
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags), "unshare")
    if flags & 0x10000000:  # CLONE_NEWUSER: map ourselves, nobody else
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    if flags & 0x00020000:  # CLONE_NEWNS
        mount(None, "/", None, 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE: nothing leaks out
        here = os.getcwd()
        for blocker, targets in cfg["exposures"]:
            stages = []
            for i, target in enumerate(targets):
                stage = os.path.join(here, ".kaizen-stage-%d" % i)
                os.mkdir(stage, 0o700)
                mount(target, stage, None, 4096 | 1 << 14)  # MS_BIND | MS_REC
                stages.append(stage)
            mount("tmpfs", blocker, "tmpfs", 2 | 4, "mode=0755,size=1m")  # MS_NOSUID | MS_NODEV
            for target, stage in zip(targets, stages):
                os.makedirs(target, 0o755, exist_ok=True)
                mount(stage, target, None, 8192)  # MS_MOVE
                os.rmdir(stage)
    if flags & 0x40000000:  # CLONE_NEWNET: bring up the private loopback (best effort)
        try:
            import fcntl, socket, struct
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = struct.pack("16sh22x", b"lo", 0)
                up = struct.unpack("16sh22x", fcntl.ioctl(s, 0x8913, req))[1] | 1
                fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", up))
        except OSError:
            pass

def exec_program():
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        import resource
        if cfg["kill"] == "pgrp":
            os.setpgid(0, 0)
        for which, soft, hard in cfg["rlimits"]:
            _, cur_hard = resource.getrlimit(which)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
            resource.setrlimit(which, (min(soft, hard), hard))
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        argv = cfg["argv"]
        os.execve(argv[0], argv, dict(os.environ))
    except BaseException as e:
        report(error="cannot start the program: %s" % (e,))
    os._exit(127)

def supervise(ns_init):
    state["role"] = "supervisor"
    if ns_init:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cfg["unshare"] & 0x00020000:
            try:  # this namespace's processes only
                mount("proc", "/proc", "proc", 2 | 4 | 8)
            except OSError:
                pass
    else:
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    pid = os.fork()
    if pid == 0:
        exec_program()
    state["child"] = pid
    detach_stdio()
    if state["stopping"]:
        kill_rest()
    status, usage = None, None
    while True:
        try:
            got, st, ru = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if got == pid:
            status, usage = st, ru
            break
    if not ns_init:  # as PID 1 our exit kills the rest
        kill_rest()
        give_up = time.monotonic() + 5
        while True:
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if got == 0:
                if time.monotonic() > give_up:
                    break
                if cfg["kill"] == "pgrp":
                    kill_rest()
                time.sleep(0.005)
    if status is not None:
        report(exit=status, cpu=usage.ru_utime + usage.ru_stime, maxrss_kib=usage.ru_maxrss)
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
try:
    setup()
except BaseException as e:
    report(error="sandbox setup: %s" % (e,))
    os._exit(125)
if cfg["unshare"] & 0x20000000:  # CLONE_NEWPID: our child is PID 1 in the new namespace
    pid = os.fork()
    if pid == 0:
        supervise(ns_init=True)
    state["child"] = pid
    detach_stdio()
    if state["stopping"]:
        kill_rest()
    while True:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        break
    os._exit(0)
supervise(ns_init=False)
"""
