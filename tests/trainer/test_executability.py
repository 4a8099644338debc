"""Executability in the sandbox (trainer.executability): the plugin's check, run on
self-contained programs under the sandbox's isolation, and the program run itself."""

from __future__ import annotations

import pytest

from trainer.executability import check_programs, executability_rate, from_run
from trainer.sandbox import RunResult, Sandbox, SandboxLimits


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=30.0, cpu_s=30), workers=2)


def test_good_and_broken_programs(sandbox: Sandbox) -> None:
    programs = [
        "import math\n\ndef area(r):\n    return math.pi * r ** 2\n\nprint(area(2))\n",
        "import math\n\ndef area(r):\n    return math.pie * r ** 2\n",  # no such attribute
        "import os\nos.path.join()\n",  # does not bind to the signature
        "import kaizen_no_such_module_xyz\n",
        "def f(:\n    pass\n",
        "values = [1, 2]\nprint(values[5])\n",  # parses and binds, raises when run
    ]
    results = check_programs(programs, sandbox=sandbox)
    assert [r.executable for r in results] == [True, False, False, False, False, False]
    good, attribute, signature, module, syntax, crash = results
    assert good.runs is True and good.problems == []
    assert attribute.api is False and "math has no attribute 'pie'" in attribute.problems
    assert signature.api is False and "missing a required argument" in signature.problems[0]
    assert module.imports is False
    assert syntax.parses is False
    assert crash.api is True and crash.runs is False and "IndexError" in crash.problems[-1]


def test_static_only_runs_nothing(sandbox: Sandbox) -> None:
    (result,) = check_programs(["values = []\nvalues[1]\n"], sandbox=sandbox, run=False)
    assert result.executable and result.runs is None


def test_a_run_killed_by_a_limit_is_inconclusive() -> None:
    static = '\n{"parses": true, "imports": true, "api": true, "runs": null, "problems": []}\n'
    timed_out = from_run(RunResult("timeout", None, static, "", 1.0, "wall-clock timeout"))
    assert timed_out.runs is None and timed_out.executable
    killed = from_run(RunResult("failed", -9, static, "", 1.0, "killed by SIGKILL"))
    assert killed.runs is False and not killed.executable
    nothing = from_run(RunResult("error", None, "", "", 0.0, "could not start"))
    assert not nothing.executable


def test_executability_rate_ignores_unchecked() -> None:
    assert executability_rate([True, False, None, True]) == pytest.approx(2 / 3)
    assert executability_rate([None]) is None
