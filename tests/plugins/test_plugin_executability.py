"""pytest-kaizen checks the files of completions no test exercised in the project's own
environment and reports them under ``executability`` (never as a verdict)."""

from __future__ import annotations

from tests.plugins.conftest import Project
from tests.plugins.fake_kaizen import FakeKaizen, ledger_entry
from tests.plugins.test_pytest_plugin import TEST_ADD, by_id, env_for, only_report

CALC = """\
import os


def add(a, b):
    return a + b


def where(p):
    return os.path.joinn(p, "x")
"""


def test_untested_completions_are_checked_in_the_projects_environment(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write("src/calc.py", CALC)
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"),
        ledger_entry("cmpl-where", 'return os.path.joinn(p, "x")'),
    )
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    report = only_report(kaizen_server)
    # The verdicts are as before: the untested one gets the run's status and no tests.
    assert by_id(report)["cmpl-where"]["tests"] == []
    assert report["executability"] == [
        {
            "completion_id": "cmpl-where",
            "choice_index": 0,
            "final_text": 'return os.path.joinn(p, "x")',
            "parses": True,
            "imports": True,
            "api": False,
            "runs": None,
            "executable": False,
            "problems": ["os.path has no attribute 'joinn'"],
        }
    ]


def test_a_good_untested_completion_is_executable(
    project: Project, kaizen_server: FakeKaizen
) -> None:
    project.write("src/calc.py", CALC.replace("joinn", "join"))
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"),
        ledger_entry("cmpl-where", 'return os.path.join(p, "x")'),
    )
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest(env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    [checked] = only_report(kaizen_server)["executability"]
    assert checked["completion_id"] == "cmpl-where" and checked["executable"] is True


def test_the_check_can_be_switched_off(project: Project, kaizen_server: FakeKaizen) -> None:
    project.write("src/calc.py", CALC)
    project.write_ledger(
        ledger_entry("cmpl-add", "return a + b"),
        ledger_entry("cmpl-where", 'return os.path.joinn(p, "x")'),
    )
    project.write("tests/test_calc.py", TEST_ADD)
    run = project.pytest("--kaizen-no-executability", env=env_for(kaizen_server))
    assert run.returncode == 0, run.output
    assert "executability" not in only_report(kaizen_server)
