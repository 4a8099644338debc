"""pytest-kaizen end to end: pytest runs a temporary project in a subprocess against the fake
server, and the report it posts is checked."""

from __future__ import annotations

import json
from typing import Any

from tests.plugins.conftest import Project
from tests.plugins.fake_kaizen import FakeKaizen, ledger_entry, running, unused_url

TEST_ADD = """\
from calc import add


def test_add():
    assert add(1, 2) == 3
"""


def env_for(server: FakeKaizen | str, token: str = "kz_ci_secret") -> dict[str, str]:
    url = server if isinstance(server, str) else server.url
    return {"KAIZEN_URL": url, "KAIZEN_TOKEN": token}


def only_report(server: FakeKaizen) -> dict[str, Any]:
    assert len(server.reports) == 1, server.reports
    return server.reports[0]


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["completion_id"]: c for c in report["completions"]}


def test_passing_test_attributes_the_completion(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    report = only_report(kaizen_server)
    assert report["status"] == "passed"
    assert report["repository"] == "local/calc-project"
    assert report["run_id"].startswith("local:")
    assert report["commit"] == "unknown"
    assert report["completions"] == [
        {
            "completion_id": "cmpl-add",
            "choice_index": 0,
            "file_path": "src/calc.py",
            "final_text": "return a + b",
            "status": "passed",
            "tests": ["tests/test_calc.py::test_add"],
        }
    ]
    [test] = report["tests"]
    assert test["name"] == "tests/test_calc.py::test_add" and test["status"] == "passed"
    assert test["duration"] >= 0
    assert f"kaizen: reported run {report['run_id']}: 1 completion (1 passed)" in run.stdout
    assert kaizen_server.token not in run.output
    assert project.spooled() == []


def test_failing_test_fails_the_completion(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write("src/calc.py", "def add(a, b):\n    return a - b\n")
    project.write_ledger(ledger_entry("cmpl-add", "return a + b", current_text="return a - b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 1, run.output
    report = only_report(kaizen_server)
    assert report["status"] == "failed"
    [completion] = report["completions"]
    assert completion["status"] == "failed"
    assert completion["final_text"] == "return a - b"
    assert completion["tests"] == ["tests/test_calc.py::test_add"]
    [test] = report["tests"]
    assert test["status"] == "failed" and "assert -1 == 3" in test["message"]
    assert "assert -1 == 3" in report["log_tail"]
    assert "1 completion (1 failed)" in run.stdout


def test_unexecuted_completion_falls_back_to_the_run_status(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"),
        ledger_entry("cmpl-mul", "return a * b"),
        ledger_entry("cmpl-gone", "return a ** b"),  # not in the file: not covered
        ledger_entry("cmpl-removed", "return a - b", state="removed"),
    )
    project.write(
        "tests/test_calc.py",
        """\
        import threading

        import pytest
        from calc import add, sub


        def test_add():
            assert add(1, 2) == 3


        def test_add_in_a_thread():
            results = []
            worker = threading.Thread(target=lambda: results.append(add(2, 2)))
            worker.start()
            worker.join()
            assert results == [4]


        def test_sub_is_wrong():
            assert sub(3, 1) == 1


        @pytest.fixture
        def broken():
            raise RuntimeError("fixture exploded")


        def test_error(broken):
            pass


        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass
        """,
    )
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 1, run.output
    report = only_report(kaizen_server)
    assert report["status"] == "failed"
    completions = by_id(report)
    assert set(completions) == {"cmpl-add", "cmpl-mul"}
    assert completions["cmpl-add"]["status"] == "passed"
    assert completions["cmpl-add"]["tests"] == [
        "tests/test_calc.py::test_add",
        "tests/test_calc.py::test_add_in_a_thread",
    ]
    assert completions["cmpl-mul"] == {**completions["cmpl-mul"], "status": "failed", "tests": []}
    statuses = {t["name"].split("::")[1]: (t["status"], t["message"]) for t in report["tests"]}
    assert statuses["test_add"] == ("passed", None)
    assert statuses["test_sub_is_wrong"][0] == "failed"
    assert statuses["test_error"][0] == "error"
    assert "fixture exploded" in statuses["test_error"][1]
    assert statuses["test_skipped"] == ("skipped", "Skipped: not today")
    assert "kaizen: reported run" in run.stdout and "(1 passed, 1 failed)" in run.stdout


def test_collection_errors_are_build_failures(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write("src/calc.py", "def add(a, b):\n    return a + b\n\ndef broken(:\n")
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 2, run.output
    report = only_report(kaizen_server)
    assert report["status"] == "build_failed"
    assert by_id(report)["cmpl-add"]["status"] == "build_failed"
    assert "SyntaxError" in report["log_tail"]


def test_server_ledger_and_git_identity(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write("tests/test_calc.py", TEST_ADD)
    commit = project.git_init("git@github.com:Acme/Calc.git")
    kaizen_server.ledger = [
        ledger_entry("cmpl-server", "return a * b", repository="github.com/acme/calc"),
        ledger_entry("cmpl-elsewhere", "return a + b", repository="github.com/acme/other"),
    ]
    run = project.pytest(env={**env_for(kaizen_server), "GITHUB_RUN_ID": "77"})
    assert run.returncode == 0, run.output
    report = only_report(kaizen_server)
    assert report["run_id"] == "github:77:1"
    assert report["repository"] == "github.com/acme/calc"
    assert report["commit"] == commit and report["branch"] == "main"
    assert by_id(report)["cmpl-server"] == {
        "completion_id": "cmpl-server",
        "choice_index": 0,
        "file_path": "src/calc.py",
        "final_text": "return a * b",
        "status": "passed",  # the run's: no test called mul
        "tests": [],
    }
    assert set(by_id(report)) == {"cmpl-server"}


def test_server_down_changes_nothing_and_the_report_is_sent_next_time(
    project: Project,
) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    project.write("tests/test_fail.py", "def test_fail():\n    assert False\n")
    down = project.pytest(env=env_for(unused_url()))
    assert down.returncode == 1, down.output
    assert "1 failed, 1 passed" in down.stdout
    assert down.stdout.count("kaizen: could not fetch the ledger") == 1
    [spooled] = project.spooled()
    assert f"kaizen: server unreachable, report spooled to {spooled}" in down.stdout
    first = json.loads(spooled.read_text())
    assert by_id(first)["cmpl-add"]["status"] == "passed"

    with running() as server:
        again = project.pytest(env=env_for(server))
        assert again.returncode == 1, again.output
        assert server.run_ids[0] == first["run_id"]
        assert len(server.run_ids) == 2 and server.run_ids[1] != first["run_id"]
    assert project.spooled() == []


def test_refused_report_is_kept_aside(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server, token="kz_wrong"))
    assert run.returncode == 0, run.output
    assert "kaizen: the server refused the report" in run.stdout
    assert "kz_wrong" not in run.output
    assert len(list((project.path / ".kaizen/spool/rejected").glob("*.json"))) == 1


def test_off_without_a_url(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest()
    assert run.returncode == 0, run.output
    assert "kaizen:" not in run.output
    assert not (project.path / ".kaizen" / "spool").exists()
    assert kaizen_server.requests == []


def test_command_line_options_enable_it(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(
        f"--kaizen-url={kaizen_server.url}", f"--kaizen-token={kaizen_server.token}"
    )
    assert run.returncode == 0, run.output
    assert only_report(kaizen_server)["completions"] == []


def test_another_tracer_means_run_level_status(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    project.write("tests/test_fail.py", "def test_fail():\n    assert False\n")
    project.write(
        "conftest.py",
        """\
        import sys


        def other_tracer(frame, event, arg):  # stands in for coverage or a debugger
            return None


        sys.settrace(other_tracer)
        """,
    )
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 1, run.output
    completion = by_id(only_report(kaizen_server))["cmpl-add"]
    assert completion["status"] == "failed" and completion["tests"] == []
    assert "run-level status: another tracer" in run.stdout


def test_no_tests_no_report(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest("--collect-only", env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    assert kaizen_server.reports == []
    assert "kaizen: no tests ran; nothing reported" in run.stdout


def test_sessions_inside_a_reporting_session_do_not_report(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(ledger_entry("cmpl-add", "return a + b"))
    project.write("conftest.py", 'pytest_plugins = ["pytester"]\n')
    project.write(
        "tests/test_nested.py",
        """\
        from calc import add


        def test_inner_sessions(pytester):
            pytester.makepyfile("def test_inner():\\n    pass\\n")
            pytester.runpytest().assert_outcomes(passed=1)
            pytester.runpytest_subprocess().assert_outcomes(passed=1)
            assert add(1, 1) == 2
        """,
    )
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    report = only_report(kaizen_server)
    assert [t["name"] for t in report["tests"]] == ["tests/test_nested.py::test_inner_sessions"]
    assert by_id(report)["cmpl-add"]["tests"] == ["tests/test_nested.py::test_inner_sessions"]


def test_refused_completions_are_a_warning_line(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"), ledger_entry("cmpl-mul", "return a * b")
    )
    project.write("tests/test_calc.py", TEST_ADD)
    kaizen_server.refused = {"cmpl-mul": "repository_not_in_scope"}
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    assert "kaizen: reported run" in run.stdout
    assert "kaizen: warning: the server refused 1 completion (cmpl-mul)" in run.stdout
    assert "--role ci --repo <that repository>" in run.stdout
