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
* where the kernel allows it (root, or an unprivileged user namespace): private network, mount,
  PID and IPC namespaces. The network namespace has only its own loopback, so nothing on the
  machine or beyond is reachable, abstract-namespace Unix sockets included; the PID namespace
  dies with its first process, taking every process of the run with it. The mount namespace
  gets a filesystem view of its own (``filesystem_isolated``): a fresh root with only what a
  Python program needs, read-only, the run's directory, private ``/tmp``, ``/run`` and
  ``/dev/shm``, so no Unix socket of the host (PostgreSQL's), no lock directory and no Kaizen
  file is there (see :mod:`trainer.sandbox_supervisor`). Whether this works is probed once per
  ``Sandbox``; if not, a WARNING is logged ("sandbox: no network isolation on this machine:
  ...") and ``network_isolated``/``filesystem_isolated`` are False: then only file modes keep
  the program out (Kaizen's database is created 0600 in a 0700 directory).

A test is judged with :meth:`Sandbox.run_test` (``check_program``, ``run_tests``): the sandbox,
not the caller, puts the test after the program, and a run passes only if the test ran to its
end. :mod:`trainer.sandbox_scan` flags (and never runs) programs whose code shows a way to end
or subvert the run early (``os._exit``, ``sys.exit``, ``atexit``, ``raise SystemExit``, touching
``builtins``, frame walking...); the rest run under :mod:`trainer.sandbox_harness`, which
writes a per-run random token, delivered through a pipe the program never sees, to a seal pipe
only after the test returned, and refuses (and flags) what could forge that. The status is
``passed`` only with exit status 0 and exactly that token; ``flagged`` (with the reason) for a
trick, ``failed`` for an honest failure.

The program runs under a small supervisor (``python -I -S trainer/sandbox_supervisor.py``) that
sets up the namespaces, forks the program with its limits and reports its exit status and
resource usage over a pipe; the caller's side reads the output with caps, enforces the wall
clock, and asks the supervisor to kill everything (SIGTERM to it) on a timeout or an oversized
output. No ``preexec_fn`` is used, so runs may start from many threads at once (``run_many``).
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
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

from tqdm import tqdm

from trainer.sandbox_scan import scan

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "Status", "check_program"]

log = logging.getLogger(__name__)

# "flagged": the program tried to end or subvert the run around its test (the reason says how).
Status = Literal[
    "passed", "failed", "flagged", "timeout", "memory", "output_limit", "killed", "error"
]
_T = TypeVar("_T")

_SUPERVISOR = Path(__file__).with_name("sandbox_supervisor.py")
_HARNESS = Path(__file__).with_name("sandbox_harness.py")
_HARNESS_SOURCE = _HARNESS.read_text(encoding="utf-8")
# The read-only part of the filesystem view besides the interpreter's own directories: the
# system's programs and libraries, and the few files of /etc a Python program reads.
_VIEW_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_VIEW_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/mime.types",
    "/etc/ssl",
    "/etc/alternatives",
)

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
# Tests switch this off to check that the harness alone still refuses every trick.
_STATIC_SCAN = True

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
    view: bool = False  # the filesystem view (needs the mount namespace)


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
    ``filesystem_isolated``: runs see only the sandbox's filesystem view, not the host's.
    ``run_uids``: the uids runs execute as, or None when they run as the caller's own user.
    """

    network_isolated: bool
    pid_isolated: bool
    filesystem_isolated: bool
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
        if self._root:
            self._uid_pool = [uid for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT) if _free(uid)]
            if not self._uid_pool:
                raise RuntimeError(f"sandbox: every uid in {_UID_BASE}+{_UID_COUNT} is taken")
            self._lock_dir = _private_dir(
                os.path.join(self._base_dir, f"kaizen-sandbox-uids-{os.geteuid()}")
            )
        self._view_ro = self._view_paths() if _TRY_NAMESPACES else []
        self._mode = self._probe()
        self.network_isolated = bool(self._mode.unshare & _CLONE_NEWNET)
        self.pid_isolated = bool(self._mode.unshare & _CLONE_NEWPID)
        self.filesystem_isolated = self._mode.view
        self.run_uids = range(_UID_BASE, _UID_BASE + _UID_COUNT) if self._mode.drop_uid else None

    # -- public API ---------------------------------------------------------------------------

    def run_python(
        self, code: str, *, files: dict[str, str] | None = None, stdin: str = ""
    ) -> RunResult:
        """Write ``code`` to main.py (and ``files`` beside it) in a fresh private directory and
        run it there under the limits. Never raises for anything the program does."""
        extra = _check_files(files or {})
        return self._run(code, extra, stdin, self._mode, self.limits)

    def run_test(
        self, code: str, test: str, *, files: dict[str, str] | None = None, stdin: str = ""
    ) -> RunResult:
        """Judge ``code`` (a program, in main.py) by ``test`` (asserts run after it, in its
        namespace): ``passed`` only if the test ran to its end and the run exited 0, ``flagged``
        (never ``passed``) for a program that tries to end or subvert the run around the test,
        the reason stored in ``reason`` ("flagged: calls os._exit (line 3)"). Never raises for
        anything the program does."""
        extra = _check_files(files or {})
        why = scan(code) if _STATIC_SCAN else None
        if why is not None:
            return RunResult("flagged", None, "", "", 0.0, f"flagged: the program {why}")
        return self._run(code, extra, stdin, self._mode, self.limits, test=test)

    def run_many(self, programs: Sequence[str], *, progress: bool = False) -> list[RunResult]:
        """Run each program (as ``run_python``) on ``workers`` threads; results in input order."""
        return self._batch(self.run_python, [(p,) for p in programs], progress)

    def run_tests(
        self, pairs: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[RunResult]:
        """Judge each ``(code, test)`` (as ``run_test``) on ``workers`` threads; results in
        input order."""
        return self._batch(self.run_test, list(pairs), progress)

    def _batch(
        self, run: Callable[..., _T], calls: Sequence[tuple[str, ...]], progress: bool
    ) -> list[_T]:
        results: dict[int, _T] = {}
        with (
            ThreadPoolExecutor(max_workers=self.workers) as pool,
            tqdm(total=len(calls), desc="sandbox", unit="run", disable=not progress) as bar,
        ):
            futures = {pool.submit(run, *args): i for i, args in enumerate(calls)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return [results[i] for i in range(len(calls))]

    # -- probing ------------------------------------------------------------------------------

    def _candidates(self) -> list[_Mode]:
        ns = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC
        modes = []
        if self._root:
            if _TRY_NAMESPACES:
                modes.append(
                    _Mode(
                        ns,
                        True,
                        "ns",
                        "namespaces (net, mount, pid, ipc) + filesystem view + private uid",
                        view=True,
                    )
                )
            modes.append(_Mode(0, True, "uid", "private uid, no namespaces"))
            modes.append(_Mode(0, False, "pgrp", "as root: no privilege drop, no namespaces"))
        else:
            if _TRY_NAMESPACES:
                modes.append(
                    _Mode(
                        ns | _CLONE_NEWUSER,
                        False,
                        "ns",
                        "user namespace (net, mount, pid, ipc) + filesystem view",
                        view=True,
                    )
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

    def _view_paths(self) -> list[str]:
        """What the filesystem view shows read-only: the system's directories, a few files of
        /etc, and the interpreter's prefix, venv and ``sys.path`` (asked of ``self.python``),
        each at its own path. Nothing that holds the run directories (a ``sys.path`` entry of
        ``/`` or ``/tmp`` would undo the view) is taken."""
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
            paths = []
        paths += [os.path.dirname(self.python), os.path.dirname(os.path.realpath(self.python))]
        runtime = {os.path.realpath(p) for p in paths if os.path.isdir(p)}
        runtime |= {p for p in paths if os.path.isdir(p) and not os.path.islink(p)}
        base = os.path.realpath(self._base_dir)
        runtime = {p for p in runtime if not _within(base, p)}
        system = [p for p in _VIEW_SYSTEM if os.path.lexists(p)]
        runtime = {p for p in runtime if not any(_within(p, q) for q in system)}
        runtime = {p for p in runtime if not any(_within(p, q) for q in runtime if q != p)}
        return system + [p for p in _VIEW_ETC if os.path.lexists(p)] + sorted(runtime)

    # -- one run ------------------------------------------------------------------------------

    def _run(
        self,
        code: str,
        files: dict[str, str],
        stdin: str,
        mode: _Mode,
        limits: SandboxLimits,
        *,
        test: str | None = None,
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
            return self._execute(workdir, stdin, mode, limits, uid, test)
        except OSError as e:
            return RunResult("error", None, "", "", time.monotonic() - start, f"sandbox: {e}")
        finally:
            if workdir:
                _remove_tree(workdir)
                # The view's mount point: only the run's mount namespace mounted anything on it.
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(workdir + ".root")
            if uid is not None and not mode.view:
                _scrub_shared_tmp(uid)  # with the view, /tmp and /dev/shm were private
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
        test: str | None,
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
        # Every pipe end here is non-inheritable; Popen's pass_fds hands the supervisor its own.
        report_r, report_w = os.pipe()
        ours, theirs = [report_r], [report_w]
        argv = [self.python, "-E", "-s", "-B", "-X", "utf8"]
        token = ""
        feeds: dict[int, bytes] = {}
        seal_r = -1
        if test is None:
            argv.append("main.py")
        else:
            # The harness reads the test and the token from input_r before the program runs;
            # only a test that returned gets the token written to seal_w (its module docstring).
            input_r, input_w = os.pipe()
            seal_r, seal_w = os.pipe()
            ours += [input_w, seal_r]
            theirs += [input_r, seal_w]
            token = secrets.token_hex(16)
            feeds[input_w] = json.dumps({"token": token, "test": test}).encode()
            harness = {
                "input_fd": input_r,
                "seal_fd": seal_w,
                "program": "main.py",
                "protected": [str(_HARNESS), str(_SUPERVISOR)],
            }
            argv += ["-c", _HARNESS_SOURCE, json.dumps(harness)]
        view = None
        if mode.view:
            view = {
                "root": workdir + ".root",
                "ro": self._view_ro,
                "rw": [workdir],
                "cwd": workdir,
                "tmpfs_bytes": limits.max_file_size_bytes,
                # A judged program gets no /proc: /proc/self/mem would expose the harness's
                # memory (the seal's token) whatever the audit hook checks.
                "proc": test is None,
            }
            os.mkdir(view["root"], 0o700)
        config = {
            "parent": os.getpid(),
            "report_fd": report_w,
            "pass_fds": theirs[1:],
            "unshare": mode.unshare,
            "view": view,
            "kill": mode.kill,
            "uid": uid,
            "rlimits": rlimits,
            "argv": argv,
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
                [self.python, "-I", "-S", str(_SUPERVISOR), json.dumps(config)],
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(theirs),
                start_new_session=True,
            )
        except OSError:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        with proc:
            try:
                outcome = _communicate(proc, report_r, stdin.encode(), feeds, seal_r, limits, start)
            except BaseException:
                # Never leave a run behind (Popen's exit waits for it): kill it all first.
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise
        outcome.duration_s = time.monotonic() - start
        return _classify(outcome, limits, token if test is not None else None)


def check_program(code: str, test: str, *, sandbox: Sandbox) -> RunResult:
    """Judge ``code`` by ``test`` (asserts) with :meth:`Sandbox.run_test`: passed when the
    test ran to its end."""
    return sandbox.run_test(code, test)


# -- the caller's side of a run ---------------------------------------------------------------


@dataclass
class _Outcome:
    stdout: _Capture
    stderr: _Capture
    reports: list[dict[str, object]]
    returncode: int | None  # the supervisor's
    stopped: str | None  # why we stopped the run: "timeout", "output_limit:<stream>", None
    seal: bytes = b""  # what the harness (or the program) wrote to the seal pipe
    duration_s: float = 0.0


def _communicate(
    proc: subprocess.Popen[bytes],
    report_r: int,
    data: bytes,
    feeds: dict[int, bytes],
    seal_r: int,
    limits: SandboxLimits,
    start: float,
) -> _Outcome:
    """Feed stdin and the harness's input (``feeds``: pipe -> bytes), read stdout/stderr
    (capped), the seal and the supervisor's reports until all close; stop the run at the
    wall-clock deadline or when an output exceeds its cap."""
    assert proc.stdout is not None and proc.stderr is not None
    captures = {
        "stdout": _Capture(limits.max_output_bytes),
        "stderr": _Capture(limits.max_output_bytes),
    }
    report_buf = bytearray()
    seal_buf = bytearray()
    stopped: str | None = None
    stop_deadline = math.inf
    deadline = start + limits.timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(report_r, selectors.EVENT_READ, "report")
    if seal_r >= 0:
        sel.register(seal_r, selectors.EVENT_READ, "seal")
    pending: dict[int, memoryview] = {}
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
    if stdin_fd >= 0:
        pending[stdin_fd] = memoryview(data)
    for fd, feed in feeds.items():
        pending[fd] = memoryview(feed)
    for fd in pending:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE, "feed")

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
                if name == "feed":
                    view = pending[fd]
                    try:
                        view = pending[fd] = view[os.write(fd, view[:_READ_CHUNK]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its end or is gone
                        view = pending[fd] = view[:0]
                    if not view:
                        sel.unregister(fd)
                        _close_feed(proc, fd, stdin_fd)
                    continue
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    sel.unregister(fd)
                elif name == "report":
                    report_buf += chunk
                elif name == "seal":
                    if len(seal_buf) < _READ_CHUNK:  # a genuine seal is one short line
                        seal_buf += chunk
                elif captures[name].add(chunk):
                    stop(f"output_limit:{name}")
    finally:
        sel.close()
        os.close(report_r)
        if seal_r >= 0:
            os.close(seal_r)
        for fd, view in pending.items():
            if view:  # not yet fed (and closed) when the run ended
                _close_feed(proc, fd, stdin_fd)
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
    return _Outcome(
        captures["stdout"], captures["stderr"], reports, returncode, stopped, bytes(seal_buf)
    )


def _close_feed(proc: subprocess.Popen[bytes], fd: int, stdin_fd: int) -> None:
    """Close a fed pipe: the program sees EOF (the harness waits for it on its input)."""
    if fd == stdin_fd:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
    else:
        os.close(fd)


def _classify(outcome: _Outcome, limits: SandboxLimits, token: str | None) -> RunResult:
    """The run's status. ``token``: the seal a run of :meth:`Sandbox.run_test` must show."""
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
    if token is not None:
        seal = outcome.seal.decode("utf-8", errors="replace")
        # A program may write junk before a flag line; it cannot remove one.
        flags = [line.split("flag: ", 1)[1] for line in seal.splitlines() if "flag: " in line]
        if flags:
            return result("flagged", code, f"flagged: the program {flags[0]}")
        if code == 0:
            if seal == token + "\n":
                return result("passed", 0, "the test ran to its end (exit code 0, sealed)")
            if seal == "fail\n":
                return result("flagged", 0, "flagged: exit code 0 after the test failed")
            if seal:
                return result("flagged", 0, "flagged: the program wrote to the harness's seal")
            return result(
                "flagged", 0, "flagged: exit code 0 before the test ran to its end (no seal)"
            )
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
