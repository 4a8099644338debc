"""The harness that runs "program + test" inside the sandbox and seals a test that ran to its end.

Not imported by Kaizen: :meth:`trainer.sandbox.Sandbox.run_test` sends this file's source as
``python -c`` (standard library only) with ``CONFIG`` (JSON: the input and seal descriptors) as
its argument; the program is ``main.py`` in the run's directory, the test and a per-run random
token come through the input pipe. The caller counts a pass only when the program exited 0
*and* the seal pipe carried exactly the token: a program that exits early (``os._exit(0)``,
``sys.exit``, an atexit handler, a signal), or a test that raised, never produces it.

Within one interpreter the program has the harness's powers, so the token is guarded in depth:

* it lives only in the *sealer*, a bare ``_thread`` thread that reads it (and the test) from the
  input pipe and closes that pipe before the program runs. The program and the test run in the
  main thread, whose frames never hold the token, so walking them (a signal handler gets a
  frame for free) finds nothing. The sealer writes the token only when the main thread is in
  :func:`_await_seal` called straight from the runner's frame, which is reached only after the
  test returned normally; a sealing request from anywhere else is flagged;
* an audit hook (``sys.addaudithook``: it cannot be removed) refuses, in every thread but the
  sealer, what could reach the sealer or the host: frame and GC introspection
  (``sys._getframe``, ``sys._current_frames``, ``gc.get_objects``...), tracing and profiling,
  other audit hooks, ctypes, new processes (fork, exec, spawn, ``subprocess``), signals
  (``os.kill``), symlinks and hard links, and opening anything on ``/proc`` (``/proc/self/mem``)
  or the harness's own files. A refusal raises ``PermissionError`` and writes a ``flag:`` line
  to the seal pipe, which spoils the seal whatever the program does next;
* the process is made non-dumpable, so a process it might still start cannot read its memory;
* before the test runs (and again after), ``builtins``, the program's ``__builtins__`` and the
  modules loaded so far are checked against a snapshot taken before the program ran;
  ``atexit`` registrations are flagged too.
"""

from __future__ import annotations

import _thread
import atexit
import builtins
import json
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing

if TYPE_CHECKING:  # the harness starts with every run: no typing or dataclasses imports then
    from _thread import LockType
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, NoReturn

# The modules the tests themselves import (MBPP+ uses math.isclose): loaded before the snapshot
# so that a program patching them is caught.
_PRELOAD = ("math",)
_REFUSED_EVENTS = {
    "sys._getframe": "walks the interpreter's frames (sys._getframe)",
    "sys._current_frames": "reads other threads' frames (sys._current_frames)",
    "sys._current_exceptions": "reads other threads' exceptions (sys._current_exceptions)",
    "sys.settrace": "installs a trace function (sys.settrace)",
    "sys.setprofile": "installs a profile function (sys.setprofile)",
    "sys.addaudithook": "installs an audit hook",
    "gc.get_objects": "walks the garbage collector's objects (gc.get_objects)",
    "gc.get_referrers": "walks the garbage collector's referrers (gc.get_referrers)",
    "gc.get_referents": "walks the garbage collector's referents (gc.get_referents)",
    "os.fork": "forks (os.fork)",
    "os.forkpty": "forks (os.forkpty)",
    "os.exec": "executes another program (os.exec*)",
    "os.posix_spawn": "spawns a process (os.posix_spawn)",
    "os.spawn": "spawns a process (os.spawn*)",
    "os.system": "runs a shell command (os.system)",
    "subprocess.Popen": "starts a subprocess",
    "os.kill": "sends a signal (os.kill)",
    "os.killpg": "sends a signal (os.killpg)",
    "os.symlink": "creates a symbolic link",
    "os.link": "creates a hard link",
}
# ctypes itself may be imported (numpy does; importing it opens the process's own symbols, a
# "ctypes.dlopen" event): every foreign call, symbol lookup and raw memory access through it is
# another "ctypes.*" event, refused.
_REFUSED_IMPORTS = frozenset(
    {"_testcapi", "_testinternalcapi", "_xxsubinterpreters", "cffi", "_posixsubprocess"}
)
# Attribute reads of these names hand out frames (3.11 audits them as object.__getattr__).
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
_PR_SET_DUMPABLE = 4
_HARNESS_FILE = "<string>"  # the co_filename of code run with python -c


def _await_seal(done_w: int, ack_r: int) -> None:
    """The runner asks for the seal here; the sealer grants it only to a request from this
    function called straight from the runner's frame, which the runner reaches only after the
    test returned."""
    os.write(done_w, b"s")
    os.read(ack_r, 1)


def _answer(ack_w: int, byte: bytes, write: Callable[[int, bytes], int] = os.write) -> None:
    # ``write`` is bound at definition time: the program cannot swap it for the sealer.
    try:  # noqa: SIM105
        write(ack_w, byte)
    except OSError:
        pass


def _text(path: object) -> str | None:
    if isinstance(path, bytes):
        return path.decode("utf-8", "surrogateescape")
    return path if isinstance(path, str) else None


def _non_dumpable() -> None:
    """No process of this uid may read our memory (ptrace, /proc/PID/mem); then forget ctypes
    (a program that wants it imports it afresh, and meets the hook at its first call)."""
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


class _Guard:
    """What the runner may ask of the guard. The hook and the sealer themselves are closures
    that only the interpreter holds (its audit hook list, the sealer's thread), so their state
    stays out of the program's reach even if it walks the runner's frames."""

    def __init__(self, flag: Callable[[str], None], allow_frames: Callable[[], None]) -> None:
        self.flag = flag
        self.allow_frames = allow_frames


def _make_guard(
    cfg: dict[str, Any], token: str, runner: FrameType, done_r: int, ack_w: int, started: LockType
) -> tuple[Callable[[str, tuple[Any, ...]], None], Callable[[], None], _Guard]:
    """Build the audit hook and the sealer (see the module docstring). Everything they call is
    bound here, before the program can replace it."""
    seal_fd = cfg["seal_fd"]
    write, read, stat, fstat = os.write, os.read, os.stat, os.fstat
    get_ident, current_frames = _thread.get_ident, sys._current_frames
    main_ident = get_ident()
    seal_id = (fstat(seal_fd).st_dev, fstat(seal_fd).st_ino)
    try:  # in the sandbox's filesystem view a judged program has no /proc at all
        proc_dev = stat("/proc/self").st_dev
    except OSError:
        proc_dev = None
    protected = set()
    for path in cfg.get("protected", []):
        try:
            st = stat(path)
        except OSError:
            continue
        protected.add((st.st_dev, st.st_ino))
    sealer: list[int] = []
    flags: list[str] = []
    frames_allowed: list[bool] = []
    seal_code = _await_seal.__code__

    # No contextlib.suppress here or below: the sealer runs these after the program, which may
    # have replaced anything reached through a module's globals.
    def flag(reason: str) -> None:
        if not flags:
            try:  # noqa: SIM105
                write(seal_fd, ("flag: " + reason + "\n").encode())
            except OSError:
                pass
        flags.append(reason)

    def allow_frames() -> None:
        frames_allowed.append(True)

    def refuse(reason: str) -> None:
        flag(reason)
        raise PermissionError("kaizen sandbox: the program " + reason + ": not allowed here")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if sealer and get_ident() == sealer[0]:
            return
        if event == "open":
            path = _text(args[0])
            if path is None:
                return
            try:
                st = stat(path)
            except (OSError, ValueError):
                return
            if st.st_dev == proc_dev:
                refuse("opens " + path + " (on /proc)")
            if (st.st_dev, st.st_ino) in protected:
                refuse("opens the harness's file " + path)
            # os.open (mode None) of a directory gives a dir_fd, and a path relative to it
            # escapes the check above (it resolves against the working directory). Only
            # directories below the working directory may be opened that way.
            if (
                args[1] is None
                and st.st_mode & 0o170000 == 0o040000
                and (path.startswith("/") or ".." in path.split("/"))
            ):
                refuse("opens the directory " + path + " as a descriptor")
        elif event == "sys._getframe":
            # typing, numpy and logging call it, so only a frame of the harness itself (its
            # code is "<string>", from -c) is refused; walking on with f_back from a frame of
            # the program's own finds nothing that forges a seal (the token is in the sealer).
            if not frames_allowed and args[0].f_code.co_filename == _HARNESS_FILE:
                refuse(_REFUSED_EVENTS[event])
        elif event in _REFUSED_EVENTS:
            refuse(_REFUSED_EVENTS[event])
        elif event.startswith("ctypes.") and event != "ctypes.dlopen":
            refuse("uses ctypes (" + event + ")")
        elif event == "import":
            if args[0] in _REFUSED_IMPORTS:
                refuse("imports " + str(args[0]))
        elif event == "object.__getattr__":
            if args[1] in _FRAME_ATTRIBUTES and not frames_allowed:
                refuse("reads a frame (." + str(args[1]) + ")")
        elif event == "object.__setattr__" and args[1] == "__code__":
            refuse("replaces a function's code")

    def seal() -> None:
        sealer.append(get_ident())
        started.release()
        while True:
            got = read(done_r, 1)
            if not got:
                return
            frames = current_frames()
            top = frames.get(main_ident)
            genuine = top is not None and top.f_code is seal_code and top.f_back is runner
            del frames, top
            # Whatever happens to the pipes (the caller gone, the program closed them), always
            # answer: the runner waits for the answer before it exits.
            if got == b"s" and genuine and not flags:
                try:
                    same = (fstat(seal_fd).st_dev, fstat(seal_fd).st_ino) == seal_id
                    if same:
                        write(seal_fd, (token + "\n").encode())
                    else:
                        flag("replaced the harness's seal descriptor")
                except OSError:
                    pass
                _answer(ack_w, b"k")
                return
            if got == b"f":  # the runner reports a failure: spoil the seal for good, first
                try:  # noqa: SIM105
                    write(seal_fd, b"fail\n")
                except OSError:
                    pass
                _answer(ack_w, b"k")
                return
            flag("asked for the seal before the test ran to its end")
            _answer(ack_w, b"n")  # do not leave the asker hanging: the seal is spoilt anyway

    return hook, seal, _Guard(flag, allow_frames)


def _snapshot() -> dict[str, tuple[Any, dict[str, Any]]]:
    return {
        name: (module, dict(vars(module)))
        for name, module in list(sys.modules.items())
        if name != "__main__" and hasattr(module, "__dict__")
    }


def _tampering(
    snapshot: dict[str, tuple[Any, dict[str, Any]]],
    builtins_copy: dict[str, Any],
    namespace: dict[str, Any],
) -> str | None:
    """How the program changed what the test relies on, if it did."""
    if namespace.get("__builtins__") is not builtins:
        return "replaces __builtins__"
    current = vars(builtins)
    for name, value in builtins_copy.items():
        if current.get(name, _MISSING) is not value:
            return "tampers with builtins (" + name + ")"
    for name, (module, attributes) in snapshot.items():
        if sys.modules.get(name) is not module:
            return "tampers with sys.modules (" + name + ")"
        now = vars(module)
        for attribute, value in attributes.items():
            if attribute.startswith("__") or name in _VOLATILE_MODULES:
                continue
            if now.get(attribute, _MISSING) is not value:
                return "tampers with the module " + name + " (" + attribute + ")"
    if atexit._ncallbacks():
        return "registers an atexit handler"
    return None


_MISSING = object()
# Modules whose globals the interpreter itself rebinds while a program runs.
_VOLATILE_MODULES = frozenset({"sys", "importlib._bootstrap", "_frozen_importlib"})


def _fail(
    guard: _Guard, done_w: int, ack_r: int, error: BaseException | None, test: str
) -> NoReturn:
    """Spoil the seal first (the sealer writes ``fail``), then explain, then exit 1."""
    try:
        os.write(done_w, b"f")
        os.read(ack_r, 1)
    except OSError:
        os._exit(1)
    guard.allow_frames()
    if error is not None:
        import linecache
        import traceback

        linecache.cache["<test>"] = (len(test), None, test.splitlines(True), "<test>")
        # The first entry is the harness's own exec() call: leave it out, as Python would.
        tb = error.__traceback__
        try:  # noqa: SIM105
            traceback.print_exception(type(error), error, tb.tb_next if tb else None)
        except BaseException:  # noqa: BLE001 - whatever the program did, the run has failed
            pass
    _flush()
    os._exit(1)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105
            stream.flush()
        except BaseException:  # noqa: BLE001 - a program may have closed or replaced them
            pass


def _run() -> None:
    cfg = json.loads(sys.argv[1])
    chunks = []
    while chunk := os.read(cfg["input_fd"], 65536):
        chunks.append(chunk)
    os.close(cfg["input_fd"])
    message = json.loads(b"".join(chunks))
    test = message["test"]
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    done_r, done_w = os.pipe()
    ack_r, ack_w = os.pipe()
    started = _thread.allocate_lock()
    started.acquire()
    hook, seal, guard = _make_guard(
        cfg, message.pop("token"), sys._getframe(), done_r, ack_w, started
    )
    del message, chunks
    for name in _PRELOAD:
        __import__(name)
    _non_dumpable()
    main = type(sys)("__main__")
    main.__file__ = cfg["program"]
    main.__builtins__ = builtins
    namespace = vars(main)
    sys.modules["__main__"] = main
    sys.argv = [cfg["program"]]
    snapshot, builtins_copy = _snapshot(), dict(vars(builtins))
    sys.addaudithook(hook)
    _thread.start_new_thread(seal, ())
    del hook, seal
    started.acquire()
    try:
        program = compile(source, cfg["program"], "exec", dont_inherit=True)
        checks = compile(test, "<test>", "exec", dont_inherit=True)
    except BaseException as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), ...
        _fail(guard, done_w, ack_r, e, test)
    # Only an Exception is an honest failure: SystemExit, KeyboardInterrupt and other
    # BaseExceptions are ways to leave before (or around) the test.
    try:
        exec(program, namespace)
    except Exception as e:  # noqa: BLE001 - the program's own failure
        _fail(guard, done_w, ack_r, e, test)
    except BaseException as e:  # noqa: BLE001
        guard.flag("raises " + type(e).__name__ + " before the test ran")
        _fail(guard, done_w, ack_r, e, test)
    if (why := _tampering(snapshot, builtins_copy, namespace)) is not None:
        guard.flag(why)
        _fail(guard, done_w, ack_r, None, test)
    try:
        exec(checks, namespace)
    except Exception as e:  # noqa: BLE001 - an assert failed, or the code raised
        _fail(guard, done_w, ack_r, e, test)
    except BaseException as e:  # noqa: BLE001
        guard.flag("raises " + type(e).__name__ + " during the test")
        _fail(guard, done_w, ack_r, e, test)
    if (why := _tampering(snapshot, builtins_copy, namespace)) is not None:
        guard.flag(why)
        _fail(guard, done_w, ack_r, None, test)
    _await_seal(done_w, ack_r)
    _flush()
    os._exit(0)


if __name__ == "__main__":
    _run()
