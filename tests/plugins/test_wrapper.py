"""kaizen-report: exit codes, streaming, reports, spooling, signals."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
from kaizen_client.wrapper import parse_status_map, status_for

from tests.plugins.conftest import QUIET_PLUGINS, Project
from tests.plugins.fake_kaizen import FakeKaizen, ledger_entry, unused_url

PY = sys.executable


def env_for(url: str, token: str = "kz_ci_secret") -> dict[str, str]:
    return {"KAIZEN_URL": url, "KAIZEN_TOKEN": token}


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_output_and_report(
    project: Project, kaizen_server: FakeKaizen, code: int
) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    script = f"import sys; print('out line'); print('err line', file=sys.stderr); sys.exit({code})"
    run = project.kaizen_report("--", PY, "-c", script, env=env_for(kaizen_server.url))
    assert run.returncode == code, run.output
    assert run.stdout.startswith("out line\n")
    assert run.stderr.startswith("err line\n")
    [report] = kaizen_server.reports
    status = "passed" if code == 0 else "failed"
    assert report["status"] == status
    assert "out line" in report["log_tail"] and "err line" in report["log_tail"]
    assert report["tests"] == []
    assert report["completions"] == [
        {
            "completion_id": "cmpl-add",
            "choice_index": 0,
            "file_path": "src/calc.py",
            "final_text": "return a + b",
            "status": status,
            "tests": [],
        }
    ]
    assert f"kaizen: reported run {report['run_id']}: 1 completion (1 {status})" in run.stderr


def test_status_mapping_options(project: Project, kaizen_server: FakeKaizen) -> None:
    env = env_for(kaizen_server.url)
    exit2 = [PY, "-c", "raise SystemExit(2)"]
    exit4 = [PY, "-c", "raise SystemExit(4)"]
    assert project.kaizen_report("--build-failed-codes", "2", "--", *exit2, env=env).returncode == 2
    opts = ["--status-map", "4=error"]
    assert project.kaizen_report(*opts, *exit4, env={**env, "KAIZEN_RUN_ID": "r2"}).returncode == 4
    assert [r["status"] for r in kaizen_server.reports] == ["build_failed", "error"]


def test_status_rules() -> None:
    assert status_for(0, {}, set()) == "passed"
    assert status_for(1, {}, set()) == "failed"
    assert status_for(2, {}, {2}) == "build_failed"
    assert status_for(-15, {}, set()) == "error"
    assert status_for(3, {3: "error"}, {3}) == "error"
    assert parse_status_map(["2=build_failed,3=error", "5=passed"]) == {
        2: "build_failed",
        3: "error",
        5: "passed",
    }
    with pytest.raises(ValueError):
        parse_status_map(["2=broken"])


def test_server_down_spools_and_keeps_the_exit_code(project: Project) -> None:
    run = project.kaizen_report("--", PY, "-c", "raise SystemExit(3)", env=env_for(unused_url()))
    assert run.returncode == 3
    [spooled] = project.spooled()
    assert f"kaizen: server unreachable, report spooled to {spooled}" in run.stderr
    assert "could not fetch the ledger" in run.stderr


def test_command_not_found(project: Project, kaizen_server: FakeKaizen) -> None:
    run = project.kaizen_report("--", "no-such-command-kz", "x", env=env_for(kaizen_server.url))
    assert run.returncode == 127
    assert "command not found: no-such-command-kz" in run.stderr
    assert kaizen_server.reports == []


def test_without_a_url_it_only_runs_the_command(project: Project) -> None:
    run = project.kaizen_report(PY, "-c", "print('hi')")  # no "--" needed
    assert run.returncode == 0 and run.stdout == "hi\n"
    assert "nothing reported" in run.stderr
    assert project.spooled() == []


def test_no_command_is_a_usage_error(project: Project) -> None:
    run = project.kaizen_report("--url", "http://127.0.0.1:1")
    assert run.returncode == 2 and "no command given" in run.stderr


def _read_line(stream: object, timeout: float) -> str:
    fd = stream.fileno()  # type: ignore[attr-defined]
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no complete line within {timeout} s (got {data!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _start(project: Project, script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "kaizen_client.wrapper", "--", PY, "-c", script],
        cwd=project.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "KAIZEN_URL": unused_url()},
    )


def test_output_is_streamed_while_the_command_runs(project: Project) -> None:
    # No flush in the child: the wrapper asks Python children not to buffer.
    process = _start(project, "import sys; print('ready'); sys.stdin.readline(); print('done')")
    try:
        assert _read_line(process.stdout, 10) == "ready\n"
        assert process.poll() is None  # still waiting for its input
        process.communicate(b"go\n", timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0


def test_sigterm_is_forwarded_to_the_command(project: Project) -> None:
    script = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    print('child got SIGTERM', flush=True)\n"
        "    sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    process = _start(project, script)
    try:
        assert _read_line(process.stdout, 10) == "ready\n"
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 7
    assert b"child got SIGTERM" in stdout


def test_console_script_is_registered() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("kaizen-report") == "kaizen_client.wrapper:main"
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("kaizen") == "pytest_kaizen.plugin"


def test_pytest_inside_the_wrapper_reports_once_with_attribution(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write(
        "tests/test_calc.py",
        "from calc import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n",
    )
    run = project.kaizen_report(
        "--", PY, "-m", "pytest", *QUIET_PLUGINS, env=env_for(kaizen_server.url)
    )
    assert run.returncode == 0, run.output
    [report] = kaizen_server.reports  # the plugin's; the wrapper's was a duplicate
    assert report["tests"][0]["name"] == "tests/test_calc.py::test_add"
    assert report["completions"][0]["tests"] == ["tests/test_calc.py::test_add"]
    assert "(already reported)" in run.stderr
    assert run.stdout.count("kaizen: reported run") == 1


def test_refused_completions_are_a_warning_line(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"), ledger_entry("cmpl-sub", "return a - b")
    )
    kaizen_server.refused = {"cmpl-sub": "repository_not_in_scope"}
    run = project.kaizen_report("--", PY, "-c", "pass", env=env_for(kaizen_server.url))
    assert run.returncode == 0, run.output  # reporting never changes the build's result
    assert "kaizen: reported run" in run.stderr
    assert (
        "kaizen: warning: the server refused 1 completion (cmpl-sub): served in a repository "
        "this CI token does not cover" in run.stderr
    )
