"""Hostile completions: tricks that try to turn a failing test into a pass must never pass.

Every trick pairs a wrong ``add`` (or a test it cannot satisfy) with a way to fake the pass:
leave early with status 0, tamper with what the test relies on, walk frames to the harness,
steal or forge the seal. Each runs twice: as the sandbox judges it (most are flagged by the
static scan without running), and with the scan switched off, so that the harness alone (its
audit hook, its snapshot checks and the seal) must refuse it. Honest passes and honest
failures beside them must keep their verdicts, and the scan must not flag any canonical
solution of MBPP+ or HumanEval.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import trainer.sandbox as sandbox_module
from trainer.pairs import failure_kind
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.sandbox_scan import scan
from trainer.tasks import humaneval_path, read_mbpp_rows

LIMITS = SandboxLimits(timeout_s=30.0, cpu_s=30)
ADD_TEST = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
WRONG = "def add(a, b):\n    return a - b\n"
HARNESS = str(Path(sandbox_module.__file__).with_name("sandbox_harness.py"))


@dataclass(frozen=True)
class Trick:
    name: str
    code: str
    test: str = ADD_TEST
    # The harness's own verdict (static scan off): "flagged" unless noted.
    runtime: str = "flagged"
    reason: str = ""  # a part of the stored reason, with the scan off


TRICKS = [
    Trick(
        "raise SystemExit(0) in the function",
        "def add(a, b):\n    raise SystemExit(0)\n",
        reason="raises SystemExit during the test",
    ),
    Trick(
        "sys.exit(0) at top level",
        "import sys\n" + WRONG + "sys.exit(0)\n",
        reason="raises SystemExit before the test ran",
    ),
    Trick(
        "os._exit(0) in the function",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        reason="exit code 0 before the test ran to its end",
    ),
    Trick("exit() builtin", WRONG + "exit(0)\n", reason="raises SystemExit"),
    Trick("quit() builtin", WRONG + "quit()\n", reason="raises SystemExit"),
    Trick(
        "atexit handler that exits 0",
        "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
        reason="registers an atexit handler",
    ),
    Trick(
        "raise KeyboardInterrupt at top level",
        WRONG + "raise KeyboardInterrupt\n",
        reason="raises KeyboardInterrupt",
    ),
    Trick(
        "BaseException subclass raised in the test",
        "class Stop(BaseException):\n    pass\ndef add(a, b):\n    raise Stop()\n",
        reason="raises Stop during the test",
    ),
    Trick(
        "patch builtins.abs",
        "import builtins\nbuiltins.abs = lambda x: 3\n" + WRONG,
        test="assert abs(add(1, 2)) == 3\n",
        reason="tampers with builtins (abs)",
    ),
    Trick(
        "replace the namespace's __builtins__",
        "import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 3)\n" + WRONG,
        test="assert abs(add(1, 2)) == 3\n",
        reason="replaces __builtins__",
    ),
    Trick(
        "patch math.isclose",
        "import math\nmath.isclose = lambda *a, **k: True\n" + WRONG,
        test="import math\nassert math.isclose(add(1, 2), 3)\n",
        reason="tampers with the module math (isclose)",
    ),
    Trick(
        "swap sys.modules['math']",
        "import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\n" + WRONG,
        test="import math\nassert math.isclose(add(1, 2), 3)\n",
        reason="tampers with sys.modules (math)",
    ),
    Trick(
        "trace function that exits when the test starts",
        "import os, sys\ndef tracer(frame, event, arg):\n"
        "    if frame.f_code.co_filename == '<test>':\n        os._exit(0)\n    return tracer\n"
        "sys.settrace(tracer)\n" + WRONG,
        reason="installs a trace function",
    ),
    Trick(
        "sys._getframe walk to the harness",
        "import sys\nharness = sys._getframe(1).f_locals\n" + WRONG,
        reason="walks the interpreter's frames",
    ),
    Trick(
        "traceback frame walk",
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
        "    up = e.__traceback__.tb_frame.f_back\n" + WRONG,
        reason="reads a frame (.tb_frame)",
    ),
    Trick(
        "generator frame walk",
        "g = (i for i in [1])\nup = g.gi_frame\n" + WRONG,
        reason="reads a frame (.gi_frame)",
    ),
    Trick(
        "gc walk for the token",
        "import gc\nseen = [o for o in gc.get_objects() if isinstance(o, dict)]\n" + WRONG,
        reason="walks the garbage collector",
    ),
    Trick(
        "read /proc/self/mem",
        "open('/proc/self/mem', 'rb')\n" + WRONG,
        runtime="any",  # flagged where /proc exists; the view gives a judged program none
        reason="opens /proc/self/mem (on /proc)",
    ),
    Trick(
        "read the harness's file",
        f"print(open({HARNESS!r}).read()[:10])\n" + WRONG,
        runtime="any",  # flagged where the file is visible; absent from the filesystem view
    ),
    Trick(
        "steal the token from the input pipe, then exit 0",
        "import os\nfound = b''\nfor fd in range(3, 64):\n    try:\n"
        "        os.set_blocking(fd, False)\n        found += os.read(fd, 4096)\n"
        "    except OSError:\n        pass\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, found)\n    except OSError:\n        pass\nos._exit(0)\n",
    ),
    Trick(
        "forge a seal on every descriptor, then exit 0",
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b'\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)\n",
    ),
    Trick(
        "ask for the seal on every descriptor",
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b's')\n"
        "    except OSError:\n        pass\n" + WRONG,
    ),
    Trick(
        "close stdout and stderr so the failure goes unseen",
        "import os\nos.close(1)\nos.close(2)\n" + WRONG,
        runtime="failed",
    ),
    Trick(
        "redirect every descriptor to /dev/null",
        "import os\nnull = os.open(os.devnull, os.O_WRONLY)\nfor fd in range(1, 64):\n"
        "    if fd != null:\n        try:\n            os.dup2(null, fd)\n"
        "        except OSError:\n            pass\n" + WRONG,
        runtime="any",
    ),
    Trick(
        "timer thread that exits 0 during the test",
        "import os, threading, time\nthreading.Timer(0.2, os._exit, (0,)).start()\n"
        "def add(a, b):\n    time.sleep(5)\n    return a - b\n",
        reason="exit code 0 before the test ran to its end",
    ),
    Trick(
        "signal handler that exits 0 during the test",
        "import os, signal, time\nsignal.signal(signal.SIGALRM, lambda s, f: os._exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.2)\n"
        "def add(a, b):\n    time.sleep(5)\n    return a - b\n",
        reason="exit code 0 before the test ran to its end",
    ),
    Trick(
        "SIGKILL itself",
        "import os, signal\n" + WRONG + "os.kill(os.getpid(), signal.SIGKILL)\n",
        reason="sends a signal (os.kill)",
    ),
    Trick(
        "subprocess",
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'])\n" + WRONG,
        reason="subprocess",
    ),
    Trick(
        "ctypes exit(0)",
        "import ctypes\nctypes.CDLL(None).exit(0)\n" + WRONG,
        reason="uses ctypes (ctypes.",
    ),
    Trick(
        "interrupt the main thread during the test",
        "import _thread\ndef add(a, b):\n    _thread.interrupt_main()\n    return a - b\n",
        # The interrupt is delivered when the main thread next checks for signals: the test's
        # own assert may fail first (seen under load in CI), a plain failure. Never a pass.
        runtime="any",
    ),
    Trick(
        # A fresh _signal module (no audit event), a handler that gets a frame for free, walks
        # up to the runner and calls the harness's own seal request: the sealer sees the call
        # does not come from the runner's frame.
        "signal-handler frame walk that calls the harness's seal request",
        "import _imp, importlib.util, os, time\n"
        "sig = _imp.create_builtin(importlib.util.find_spec('_signal'))\n"
        "_imp.exec_builtin(sig)\n"
        "def handler(signum, frame):\n"
        "    while frame is not None and frame.f_code.co_name != '_run':\n"
        "        frame = frame.f_back\n"
        "    runner = frame.f_locals\n"
        "    frame.f_globals['_await_seal'](runner['done_w'], runner['ack_r'])\n"
        "    os._exit(0)\n"
        "sig.signal(sig.SIGALRM, handler)\n"
        "sig.setitimer(sig.ITIMER_REAL, 0.2)\n"
        "def add(a, b):\n    time.sleep(5)\n    return a - b\n",
        reason="asked for the seal before the test ran to its end",
    ),
]


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


@pytest.fixture
def harness_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module, "_STATIC_SCAN", False)


def test_at_least_fifteen_distinct_tricks() -> None:
    assert len({t.name for t in TRICKS}) == len(TRICKS) >= 15
    assert len({t.code for t in TRICKS}) == len(TRICKS)


@pytest.mark.parametrize("trick", TRICKS, ids=[t.name for t in TRICKS])
def test_trick_is_flagged_as_judged(sandbox: Sandbox, trick: Trick) -> None:
    result = sandbox.run_test(trick.code, trick.test)
    assert not result.passed
    assert result.status == "flagged", result
    assert result.reason.startswith("flagged: the program ")


@pytest.mark.parametrize("trick", TRICKS, ids=[t.name for t in TRICKS])
def test_trick_never_passes_the_harness_alone(
    sandbox: Sandbox, harness_only: None, trick: Trick
) -> None:
    result = sandbox.run_test(trick.code, trick.test)
    assert not result.passed, result
    assert result.status != "passed"
    assert result.reason  # always stored
    if not sandbox.filesystem_isolated:
        # Without the view (no mount namespace: warned) a trick may end as a plain failure
        # rather than a flag (seen: interrupt_main as root); it must still never pass.
        return
    if trick.runtime != "any":
        assert result.status == trick.runtime, result
    if trick.runtime == "flagged":
        assert result.reason.startswith("flagged: "), result
        assert trick.reason in result.reason, result
    assert result.reason  # always stored


def test_every_trick_would_pass_if_the_test_were_skipped(sandbox: Sandbox) -> None:
    """The tricks are real: each wrong program fails its test when it plays fair, and the
    right answer passes the same test (so a flag is what stops the trick, not a broken test)."""
    right = "import math\ndef add(a, b):\n    return a + b\n"
    for test in {t.test for t in TRICKS}:
        assert sandbox.run_test(right, test).passed, test
        assert sandbox.run_test(WRONG, test).status == "failed", test


# -- honest programs keep their verdicts ------------------------------------------------------

HONEST_PASSES = {
    "plain": "def add(a, b):\n    return a + b\n",
    "sys.maxsize and recursion limit": "import sys\nsys.setrecursionlimit(10000)\n"
    "def add(a, b):\n    assert sys.maxsize > 0\n    return a + b\n",
    "eval of data": "def add(a, b):\n    return eval(f'{a} + {b}')\n",
    "re, collections, math, itertools": "import re, math, itertools\n"
    "from collections import Counter\ndef add(a, b):\n"
    "    assert re.match(r'\\d', '1') and Counter('aa')['a'] == 2\n"
    "    return int(math.fsum([a, b])) + len(list(itertools.chain()))\n",
    "prints and reads its stdin": "import sys\nprint('hello')\nsys.stdin.read()\n"
    "def add(a, b):\n    return a + b\n",
    "threads it joins": "import threading\nout = []\nt = threading.Thread(target=out.append, "
    "args=(1,))\nt.start()\nt.join()\ndef add(a, b):\n    return a + b + out[0] - 1\n",
    "catches its own exceptions": "def add(a, b):\n    try:\n        return a + b\n"
    "    except Exception:\n        raise\n    finally:\n        pass\n",
    "classes and generators": "class Adder:\n    def __call__(self, a, b):\n"
    "        return sum(x for x in (a, b))\nadd = Adder()\n",
}


@pytest.mark.parametrize("name", list(HONEST_PASSES))
def test_honest_pass_stays_a_pass(sandbox: Sandbox, name: str) -> None:
    result = sandbox.run_test(HONEST_PASSES[name], ADD_TEST)
    assert result.status == "passed", result
    assert result.exit_code == 0
    assert result.reason == "the test ran to its end (exit code 0, sealed)"


def test_honest_output_is_kept(sandbox: Sandbox) -> None:
    result = sandbox.run_test("print('hi')\n" + HONEST_PASSES["plain"], "print('test ran')")
    assert result.passed
    assert result.stdout == "hi\ntest ran\n"


def test_numpy_still_imports(sandbox: Sandbox) -> None:
    pytest.importorskip("numpy")
    code = "import numpy as np\ndef add(a, b):\n    return int(np.add(a, b))\n"
    assert sandbox.run_test(code, ADD_TEST).passed


def test_honest_assertion_failure(sandbox: Sandbox) -> None:
    result = sandbox.run_test(WRONG, ADD_TEST)
    assert result.status == "failed" and result.exit_code == 1
    assert result.reason == "exit code 1"
    assert result.stderr.rstrip().splitlines()[-1] == "AssertionError"
    assert 'File "<test>", line 1' in result.stderr  # the failing assert is shown
    assert "assert add(1, 2) == 3" in result.stderr
    assert "_run" not in result.stderr  # the harness's own frame is left out
    assert failure_kind(result) == "assertion"


def test_honest_syntax_error(sandbox: Sandbox) -> None:
    result = sandbox.run_test("def add(a, b):\n    return a +\n", ADD_TEST)
    assert result.status == "failed"
    assert result.stderr.rstrip().splitlines()[-1].startswith("SyntaxError")
    assert failure_kind(result) == "syntax"


def test_honest_runtime_error(sandbox: Sandbox) -> None:
    result = sandbox.run_test("def add(a, b):\n    return a + undefined\n", ADD_TEST)
    assert result.status == "failed"
    assert result.stderr.rstrip().splitlines()[-1].startswith("NameError")
    assert failure_kind(result) == "runtime"


def test_honest_timeout_stays_a_timeout() -> None:
    sandbox = Sandbox(SandboxLimits(timeout_s=2.0, cpu_s=60))
    result = sandbox.run_test("def add(a, b):\n    while True:\n        pass\n", ADD_TEST)
    assert result.status == "timeout"


def test_run_tests_keeps_order_and_verdicts(sandbox: Sandbox) -> None:
    pairs = [
        (HONEST_PASSES["plain"], ADD_TEST),
        (WRONG, ADD_TEST),
        (TRICKS[2].code, ADD_TEST),
        (HONEST_PASSES["eval of data"], ADD_TEST),
    ]
    results = sandbox.run_tests(pairs, progress=True)
    assert [r.status for r in results] == ["passed", "failed", "flagged", "passed"]


def test_test_code_cannot_be_read_by_the_program(sandbox: Sandbox) -> None:
    """The test comes through a pipe the harness closed: no file in the run holds it."""
    code = (
        "import os\nfor root, dirs, files in os.walk('.'):\n    for f in files:\n"
        "        assert 'SECRET_' + 'EXPECTED' not in open(os.path.join(root, f)).read()\n"
        + HONEST_PASSES["plain"]
    )
    assert sandbox.run_test(code, ADD_TEST + "# SECRET_EXPECTED\n").passed


# -- the scan does not flag honest code -------------------------------------------------------


def test_scan_flags_no_canonical_solution() -> None:
    mbpp = read_mbpp_rows()
    with gzip.open(humaneval_path(), "rt") as f:
        humaneval = [json.loads(line) for line in f]
    codes = [r["canonical_solution"] for r in mbpp]
    codes += [r["prompt"] + r["canonical_solution"] for r in humaneval]
    assert len(codes) == 301 + 164
    assert [(i, scan(c)) for i, c in enumerate(codes) if scan(c)] == []


def test_scan_reasons_name_the_line() -> None:
    assert scan("import os\n\nos._exit(0)\n") == "calls os._exit (line 3)"
    assert scan("import sys as s\ns.exit()\n") == "calls sys.exit (line 2)"
    assert scan("from os import _exit\n") == "calls os._exit (line 1)"
    assert scan("import math\nmath.pi = 3\n") == "changes the module math (math.pi =) (line 2)"
    assert scan("def f(:\n") is None  # running it gives the honest SyntaxError
    assert scan("import sys\nprint(sys.maxsize)\n") is None


DIR_FD_PROC = (
    "import os\nroot = os.open('/', os.O_RDONLY)\n"
    "try:\n    os.open('proc/self/mem', os.O_RDONLY, dir_fd=root)\n    where = 'opened'\n"
    "except OSError as e:\n    where = type(e).__name__\n"
    "def add(a, b):\n    return a + b if where == 'FileNotFoundError' else 0\n"
)


def test_a_judged_program_has_no_proc(sandbox: Sandbox, harness_only: None) -> None:
    """/proc/self/mem would expose the harness's memory (the token) to a program that opens it
    in a way the audit hook cannot resolve (a path relative to a directory descriptor)."""
    if not sandbox.filesystem_isolated:
        pytest.skip("no filesystem view here: only the audit hook guards /proc (warned)")
    # Opening / as a descriptor is itself refused now; a directory below the working one is
    # not, and ../ from it saturates at / for the hook too, so this reaches a missing /proc.
    code = DIR_FD_PROC.replace("os.open('/', os.O_RDONLY)", "os.open('.', os.O_RDONLY)")
    code = code.replace("'proc/self/mem'", "'../../../../../../proc/self/mem'")
    assert sandbox.run_test(code, ADD_TEST).passed
    assert sandbox.run_python("import os\nprint(os.path.exists('/proc/self'))").stdout == "True\n"


def test_a_directory_descriptor_outside_the_run_is_refused(sandbox: Sandbox) -> None:
    """Without the view /proc is the host's: a path relative to a descriptor of / would slip
    past the hook's path check, so such a descriptor is refused (and flagged)."""
    result = sandbox.run_test(DIR_FD_PROC, ADD_TEST)  # the scan sees nothing here
    assert result.status == "flagged", result
    assert result.reason == "flagged: the program opens the directory / as a descriptor"


def test_files_and_stdin_reach_a_judged_program(sandbox: Sandbox) -> None:
    """stdin and the harness's input are fed side by side (both must reach EOF)."""
    code = (
        "import sys\nfrom helper import VALUE\nextra = int(sys.stdin.read())\n"
        "def add(a, b):\n    return a + b + VALUE - extra\n"
    )
    result = sandbox.run_test(code, ADD_TEST, files={"helper.py": "VALUE = 40"}, stdin="40\n")
    assert result.status == "passed", result
