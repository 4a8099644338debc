"""The sandbox that runs model-generated code: limits, isolation, clean-up, batching.

Fast (a few seconds): the slow cases use short limits. Whatever isolation this machine lacks
is skipped with the reason, after checking that the sandbox warned about it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

import trainer.sandbox as sandbox_module
from trainer.sandbox import RunResult, Sandbox, SandboxLimits, check_program

# Programs that should finish get plenty of wall clock: CI machines are often busy.
LIMITS = SandboxLimits(timeout_s=30.0, cpu_s=30)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def _processes(match: Callable[[int, str], bool]) -> list[int]:
    """Live (non-zombie) processes whose uid and command line satisfy ``match``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if status.get("State", "").strip().startswith("Z"):
            continue
        if match(int(status["Uid"].split()[0]), cmdline):
            found.append(int(pid))
    return found


def _eventually_none(match: Callable[[int, str], bool], within_s: float = 2.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := _processes(match)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def world_readable_dir() -> Iterator[str]:
    """A directory others may enter but not write to (unlike pytest's 0700 tmp_path)."""
    path = tempfile.mkdtemp(prefix="kaizen-sandbox-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"cpu_s": 0},
        {"memory_bytes": 1024},
        {"max_processes": 0},
        {"max_output_bytes": 0},
        {"max_file_size_bytes": -1},
    ],
)
def test_limits_reject_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SandboxLimits(**kwargs)  # type: ignore[arg-type]


def test_limits_reject_wrong_types() -> None:
    with pytest.raises(TypeError):
        SandboxLimits(cpu_s=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SandboxLimits(max_processes=True)


def test_bad_file_names_are_refused(sandbox: Sandbox) -> None:
    for name in ["../escape.py", "/etc/passwd", "main.py", "a/../../b", ""]:
        with pytest.raises(ValueError):
            sandbox.run_python("pass", files={name: "x"})


# -- outcomes ---------------------------------------------------------------------------------


def test_passing_program(sandbox: Sandbox) -> None:
    result = sandbox.run_python("print('hello')")
    assert result.status == "passed" and result.passed
    assert result.exit_code == 0
    assert result.stdout == "hello\n"
    assert result.stderr == ""
    assert result.duration_s > 0


def test_failing_assert(sandbox: Sandbox) -> None:
    result = sandbox.run_python("assert 1 + 1 == 3, 'arithmetic'")
    assert result.status == "failed"
    assert result.exit_code == 1
    assert "AssertionError: arithmetic" in result.stderr
    assert result.reason == "exit code 1"


def test_files_beside_main_are_importable_and_stdin_is_fed(sandbox: Sandbox) -> None:
    code = "import sys\nfrom pkg.helper import VALUE\nprint(VALUE + int(sys.stdin.read()))"
    files = {"pkg/__init__.py": "", "pkg/helper.py": "VALUE = 40"}
    result = sandbox.run_python(code, files=files, stdin="2\n")
    assert result.status == "passed", result.stderr
    assert result.stdout == "42\n"


def test_check_program(sandbox: Sandbox) -> None:
    code = "def add(a, b):\n    return a + b"
    assert check_program(code, "assert add(2, 3) == 5", sandbox=sandbox).status == "passed"
    failed = check_program(code, "assert add(2, 3) == 6", sandbox=sandbox)
    assert failed.status == "failed"
    assert "AssertionError" in failed.stderr
    # Leaving before the test is not a pass (it was, when the caller concatenated the two).
    early = check_program("import os\nos._exit(0)\n", "assert add(2, 3) == 5", sandbox=sandbox)
    assert early.status == "flagged" and not early.passed
    assert early.reason == "flagged: the program calls os._exit (line 2)"


def test_site_packages_stay_importable(sandbox: Sandbox) -> None:
    pytest.importorskip("numpy")
    result = sandbox.run_python("import numpy\nprint(int(numpy.arange(4).sum()))")
    assert result.status == "passed", result.stderr
    assert result.stdout == "6\n"


# -- limits -----------------------------------------------------------------------------------


def test_endless_loop_times_out_and_nothing_of_it_survives() -> None:
    marker = f"1000.{uuid.uuid4().int % 10**9}"  # unique `sleep` arguments find the children
    code = f"""
import subprocess
subprocess.Popen(["sleep", "{marker}1"])
subprocess.Popen(["sleep", "{marker}2"], start_new_session=True)  # leaves the process group
print("ready", flush=True)
while True:
    pass
"""
    sandbox = Sandbox(SandboxLimits(timeout_s=2.0, cpu_s=60))
    result = sandbox.run_python(code)
    assert result.status == "timeout"
    assert result.reason == "wall-clock timeout after 2 s"
    assert result.stdout == "ready\n"
    assert result.duration_s >= 2.0
    assert _eventually_none(lambda _, cmd: f"sleep {marker}1" in cmd) == []
    if not (sandbox.pid_isolated or sandbox.run_uids):
        pytest.skip("no PID namespace and no private uid: a process that leaves its group lives")
    assert _eventually_none(lambda _, cmd: f"sleep {marker}2" in cmd) == []


def test_cpu_limit_is_a_timeout() -> None:
    sandbox = Sandbox(SandboxLimits(timeout_s=30.0, cpu_s=1))
    result = sandbox.run_python("while True:\n    pass")
    assert result.status == "timeout"
    assert "CPU time limit of 1 s" in result.reason


def test_fork_bomb_is_contained() -> None:
    limits = SandboxLimits(timeout_s=5.0, cpu_s=5, max_processes=32)
    sandbox = Sandbox(limits)
    if os.geteuid() == 0 and sandbox.run_uids is None:
        pytest.skip("running as root without a private uid: RLIMIT_NPROC would not hold")
    result = sandbox.run_python("import os\nprint(os.getuid(), flush=True)\nwhile True: os.fork()")
    assert result.status != "passed"
    assert result.duration_s < limits.timeout_s + sandbox_module._KILL_GRACE_S + 2
    # The machine is fine: we can still start processes.
    assert subprocess.run(["true"], timeout=30).returncode == 0
    if sandbox.run_uids is not None:
        uid = int(result.stdout.split()[0])
        assert uid in sandbox.run_uids
        assert _eventually_none(lambda u, _: u == uid) == []


def test_large_allocation_is_a_memory_error(sandbox: Sandbox) -> None:
    result = sandbox.run_python("x = bytearray(10**10)")
    assert result.status == "memory"
    assert "MemoryError" in result.stderr
    assert "memory limit 1024 MiB" in result.reason


def test_output_is_capped() -> None:
    sandbox = Sandbox(SandboxLimits(timeout_s=30.0, max_output_bytes=65536))
    result = sandbox.run_python('print("x" * 10**7)\nprint("not reached")')
    assert result.status == "output_limit"
    assert result.reason == "exceeded output limit of 65536 bytes on stdout"
    assert result.stdout.startswith("x" * 65536)
    assert result.stdout.rstrip().endswith("[kaizen sandbox: output truncated at 65536 bytes]")
    assert len(result.stdout) < 65536 + 100


def test_stderr_is_capped_too() -> None:
    sandbox = Sandbox(SandboxLimits(timeout_s=30.0, max_output_bytes=1000))
    result = sandbox.run_python('import sys\nsys.stderr.write("e" * 5000)')
    assert result.status == "output_limit"
    assert result.reason.endswith("on stderr")
    assert len(result.stderr) < 1100


# -- isolation --------------------------------------------------------------------------------


def test_cannot_write_or_read_outside(sandbox: Sandbox, world_readable_dir: str) -> None:
    if sandbox.run_uids is None:
        pytest.skip("runs as the caller's own user here: its files are the program's too")
    inside = os.path.join(world_readable_dir, "should_not_exist")
    secret = os.path.join(world_readable_dir, "secret")
    with open(secret, "w") as f:
        f.write("hunter2")
    os.chmod(secret, 0o600)
    # Denied by file modes (no view), or absent from the view / read-only there (with one).
    code = f"""
for path in [{inside!r}, "/root/should_not_exist"]:
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError:
        print("denied", path)
try:
    print(open({secret!r}).read())
except OSError:
    print("denied read")
open({inside!r}, "w")
"""
    result = sandbox.run_python(code)
    assert result.status == "failed"
    expected = "FileNotFoundError" if sandbox.filesystem_isolated else "PermissionError"
    assert expected in result.stderr
    assert result.stdout.splitlines() == [
        f"denied {inside}",
        "denied /root/should_not_exist",
        "denied read",
    ]
    assert not os.path.exists(inside)
    assert not os.path.exists("/root/should_not_exist")


def test_network_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.sandbox"):
        sandbox = Sandbox(LIMITS)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    print("connected")
except OSError as e:
    print("blocked", type(e).__name__)
# The program's own loopback still works.
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    socket.create_connection(s.getsockname(), timeout=5).close()
    print("own loopback ok")
"""
        result = sandbox.run_python(code)
        if not sandbox.network_isolated:
            assert "sandbox: no network isolation on this machine" in caplog.text
            pytest.skip("this machine gives the sandbox no network namespace (warning logged)")
        assert result.status == "passed", result.stderr
        assert result.stdout.splitlines()[0].startswith("blocked")
        assert result.stdout.splitlines()[1] == "own loopback ok"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the test's server


def test_fallback_without_namespaces_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox_module, "_TRY_NAMESPACES", False)
    with caplog.at_level(logging.WARNING, logger="trainer.sandbox"):
        sandbox = Sandbox(LIMITS)
    assert not sandbox.network_isolated and not sandbox.pid_isolated
    assert not sandbox.filesystem_isolated
    assert "sandbox: no network isolation on this machine: namespaces not tried" in caplog.text
    assert sandbox.run_python("print(6 * 7)").stdout == "42\n"


def test_environment_does_not_leak(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_SECRET", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    code = "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())"
    result = sandbox.run_python(code)
    assert result.status == "passed", result.stderr
    assert "KAIZEN_SECRET" not in result.stdout and "HF_TOKEN" not in result.stdout
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[1] == "True"


def test_private_directory_is_removed(sandbox: Sandbox) -> None:
    leftover = f"/tmp/kaizen-sandbox-leftover-{uuid.uuid4().hex}"
    code = f"""
import os, stat, tempfile
here = os.getcwd()
print(here, oct(stat.S_IMODE(os.stat(here).st_mode)), tempfile.gettempdir() == here)
os.makedirs("deep/er")
os.chmod("deep", 0)  # clean-up must cope
open({leftover!r}, "w").write("x")
"""
    result = sandbox.run_python(code)
    assert result.status == "passed", result.stderr
    workdir, mode, tmp_is_private = result.stdout.split()
    assert mode == "0o700" and tmp_is_private == "True"
    assert not os.path.exists(workdir)
    if sandbox.run_uids is not None:  # what the run uid left in /tmp is scrubbed
        assert not os.path.exists(leftover)
    elif os.path.exists(leftover):
        os.unlink(leftover)


# -- batches ----------------------------------------------------------------------------------


def test_run_many_preserves_order(sandbox: Sandbox) -> None:
    programs = [
        f"import time\ntime.sleep({0.3 if i % 2 == 0 else 0})\nprint({i})" for i in range(6)
    ]
    programs.append("raise SystemExit(3)")
    results = sandbox.run_many(programs, progress=True)
    assert all(isinstance(r, RunResult) for r in results)
    assert [r.status for r in results] == ["passed"] * 6 + ["failed"]
    assert [r.stdout for r in results[:6]] == [f"{i}\n" for i in range(6)]
    assert results[6].exit_code == 3


def test_run_many_of_nothing(sandbox: Sandbox) -> None:
    assert sandbox.run_many([]) == []


def _descendants(root: int) -> set[int]:
    """Live processes below ``root`` (by parent pid)."""
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        after = stat[stat.rindex(b")") + 2 :].split()
        if after[0] != b"Z":
            parents[int(pid)] = int(after[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def test_a_killed_caller_leaves_no_run_behind() -> None:
    """The wall clock lives in the caller: if it is SIGKILLed mid-run, the run must die too
    (the supervisor, PID 1 of the namespace and the program die with their parents)."""
    caller = (
        "from trainer.sandbox import Sandbox\nsandbox = Sandbox()\nprint('ready', flush=True)\n"
        "sandbox.run_test('import time\\ndef add(a, b):\\n    time.sleep(300)\\n', 'add(1, 2)')\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", caller], stdout=subprocess.PIPE, cwd=repo)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 20
    while len(run := _descendants(proc.pid)) < 2:  # the supervisor(s) and the program
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    time.sleep(0.5)
    run = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while (left := [pid for pid in run if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
