"""Execution benchmarks: the exact McNemar test, paired comparisons, and evaluate() end to end
with a scripted generator and the real sandbox (no model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from trainer.evaluate import (
    SUITES,
    Comparison,
    EvalResult,
    compare,
    evaluate,
    load_suite,
    mcnemar_exact,
)
from trainer.generate import GenerationRequest
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.tasks import Task, mbpp_path

# The copy that ships with Kaizen; KAIZEN_MBPP_PATH overrides it.
MBPP_PATH = mbpp_path(os.environ.get("KAIZEN_MBPP_PATH"))

# -- McNemar ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wins", "losses", "expected"),
    [
        (0, 0, 1.0),
        (1, 0, 1.0),
        (3, 3, 1.0),
        (10, 0, 2 * 0.5**10),
        (5, 1, 0.21875),  # 2 * (1 + 6) / 64
        (9, 2, 0.0654296875),  # 2 * (1 + 11 + 55) / 2048
    ],
)
def test_mcnemar_exact_known_values(wins: int, losses: int, expected: float) -> None:
    assert mcnemar_exact(wins, losses) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(losses, wins) == mcnemar_exact(wins, losses)


def test_mcnemar_exact_large_counts_do_not_underflow() -> None:
    assert mcnemar_exact(600, 600) == pytest.approx(1.0)
    assert 0.0 < mcnemar_exact(1000, 900) < 0.05
    assert mcnemar_exact(2000, 0) == 0.0  # 2**-1999: below the smallest double, and right so


def test_mcnemar_exact_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 3)


# -- compare ----------------------------------------------------------------------------------


def _result(
    passed: list[bool], *, suite: str = "mbpp_dev", ids: list[str] | None = None
) -> EvalResult:
    ids = ids if ids is not None else [f"t{i}" for i in range(len(passed))]
    return EvalResult(
        suite=suite,
        adapter=None,
        task_ids=ids,
        passed=passed,
        completions=[""] * len(passed),
        duration_s=1.0,
    )


def test_compare_counts_wins_and_losses() -> None:
    base = _result([True, True, False, False, True, False])
    candidate = _result([True, False, True, True, True, True])
    c = compare(base, candidate)
    assert c == Comparison(
        suite="mbpp_dev",
        n=6,
        base_passed=3,
        candidate_passed=5,
        wins=3,
        losses=1,
        p_value=mcnemar_exact(3, 1),
    )
    assert c.delta_points == pytest.approx(200 / 6)
    assert compare(candidate, base).delta_points == pytest.approx(-200 / 6)


def test_compare_refuses_other_tasks_order_or_suite() -> None:
    base = _result([True, False], ids=["a", "b"])
    with pytest.raises(ValueError, match="same task list"):
        compare(base, _result([True, False], ids=["b", "a"]))
    with pytest.raises(ValueError, match="same task list"):
        compare(base, _result([True, False, True], ids=["a", "b", "c"]))
    with pytest.raises(ValueError, match="suite"):
        compare(base, _result([True, False], ids=["a", "b"], suite="humaneval"))
    with pytest.raises(ValueError, match="1 results for 2 tasks"):
        compare(base, _result([True], ids=["a", "b"]))


def test_eval_result_pass_at_1_and_json_round_trip() -> None:
    result = _result([True, False, True, True])
    assert result.pass_at_1 == 0.75
    data = result.to_json()
    assert data["passed"] == 3 and data["n"] == 4 and data["pass_at_1"] == 0.75
    assert EvalResult.from_json(data) == result
    assert _result([]).pass_at_1 == 0.0


# -- evaluate ---------------------------------------------------------------------------------

TASKS = [
    Task(
        task_id="add",
        source="mbpp",
        prompt='def add(a, b):\n    """Return a + b."""\n',
        suffix="\n",
        test="assert add(2, 3) == 5\nassert add(-1, 1) == 0\n",
    ),
    Task(
        task_id="square/line",
        source="humaneval_fim",
        prompt="def square(x):\n    ",
        suffix="\n    return y\n",
        test="assert square(3) == 9\n",
        single_line=True,
    ),
    Task(
        task_id="first",
        source="humaneval",
        prompt='def first(xs):\n    """The first element."""\n',
        suffix="\n",
        test="assert first([7, 8]) == 7\n",
    ),
    Task(
        task_id="loops",
        source="mbpp",
        prompt="def loops():\n",
        suffix="\n",
        test="assert loops() == 1\n",
    ),
]
RIGHT = {
    "add": "    return a + b",
    "square/line": "y = x * x",
    "first": "    return xs[0]",
    "loops": "    return 1",
}
WRONG = {
    "add": "    return a - b",  # fails its asserts
    "square/line": "y = x +* x",  # a syntax error
    "first": "    return xs[0]",  # right after all
    "loops": "    while True:\n        pass",  # runs into the CPU limit
}


class ScriptedGenerator:
    """Answers each request from a script keyed by prompt, and records how it was called."""

    def __init__(self, by_prompt: dict[str, str]) -> None:
        self.by_prompt = by_prompt
        self.calls: list[tuple[list[GenerationRequest], dict[str, Any]]] = []

    def generate(self, requests: Sequence[GenerationRequest], **kwargs: Any) -> list[list[str]]:
        self.calls.append((list(requests), kwargs))
        return [[self.by_prompt[r.prompt]] * kwargs.get("n", 1) for r in requests]


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=15.0, cpu_s=2), workers=2)


def test_evaluate_runs_every_completion_in_the_sandbox(sandbox: Sandbox) -> None:
    script = {
        t.prompt: (RIGHT if t.task_id in ("add", "first") else WRONG)[t.task_id] for t in TASKS
    }
    generator = ScriptedGenerator(script)
    result = evaluate(
        generator, TASKS, suite="toy", sandbox=sandbox, adapter=Path("/a/v1"), progress=False
    )
    assert result.suite == "toy" and result.adapter == "/a/v1"
    assert result.task_ids == ["add", "square/line", "first", "loops"]
    assert result.passed == [True, False, True, False]
    assert result.completions == [script[t.prompt] for t in TASKS]
    assert result.pass_at_1 == 0.5 and result.duration_s > 0
    # Passes are executable by their verdict; a syntax error is not; a function that loops
    # forever only when called, and one that fails its asserts, still run.
    assert result.executable == [True, False, True, True]
    assert result.executability_rate == 0.75

    ((requests, kwargs),) = generator.calls
    assert requests == [GenerationRequest(t.prompt, t.suffix, t.single_line) for t in TASKS]
    assert kwargs["temperature"] == 0.0 and kwargs["n"] == 1
    assert kwargs["adapter"] == Path("/a/v1") and kwargs["max_tokens"] == 384


def test_executability_rate_beside_pass_at_1(sandbox: Sandbox) -> None:
    tasks = [
        Task(
            task_id="api",
            source="mbpp",
            prompt="import math\n\ndef f(x):\n",
            suffix="\n",
            test="assert f(4) == 2\n",
        ),
        Task(
            task_id="run",
            source="mbpp",
            prompt="def g():\n",
            suffix="\ng()\n",
            test="assert g() == 1\n",
        ),
    ]
    broken = ScriptedGenerator(
        {
            tasks[0].prompt: "    return math.squareroot(x)",  # no such function
            tasks[1].prompt: "    return {}['k']",  # raises when the program runs
        }
    )
    result = evaluate(broken, tasks, suite="toy", sandbox=sandbox, progress=False)
    assert result.passed == [False, False] and result.executable == [False, False]
    assert result.executability_rate == 0.0
    data = result.to_json()
    assert data["executability_rate"] == 0.0 and data["tasks"][0]["executable"] is False
    assert EvalResult.from_json(data) == result
    unchecked = evaluate(
        broken, tasks, suite="toy", sandbox=sandbox, progress=False, executability=False
    )
    assert unchecked.executable is None and unchecked.executability_rate is None
    assert EvalResult.from_json(unchecked.to_json()) == unchecked


def test_evaluate_then_compare(sandbox: Sandbox) -> None:
    wrong = ScriptedGenerator({t.prompt: WRONG[t.task_id] for t in TASKS})
    right = ScriptedGenerator({t.prompt: RIGHT[t.task_id] for t in TASKS})
    base = evaluate(wrong, TASKS[:3], suite="toy", sandbox=sandbox, progress=False)
    candidate = evaluate(right, TASKS[:3], suite="toy", sandbox=sandbox, progress=False)
    assert base.adapter is None
    assert (base.passed, candidate.passed) == ([False, False, True], [True, True, True])
    c = compare(base, candidate)
    assert (c.wins, c.losses, c.base_passed, c.candidate_passed) == (2, 0, 1, 3)
    assert c.p_value == 0.5


# -- suites -----------------------------------------------------------------------------------


def test_load_suite_names() -> None:
    assert set(SUITES) == {"mbpp_train", "mbpp_dev", "mbpp_test", "humaneval", "humaneval_fim"}
    with pytest.raises(ValueError, match="mbpp_train, mbpp_dev, mbpp_test, humaneval"):
        load_suite("mbpp", mbpp_path=MBPP_PATH)
    assert len(load_suite("humaneval", mbpp_path=MBPP_PATH)) == 164
    fim = load_suite("humaneval_fim", mbpp_path=MBPP_PATH)
    assert len(fim) == 164 and all(t.single_line for t in fim)


def test_load_suite_mbpp_splits() -> None:
    sizes = {s: len(load_suite(s, mbpp_path=MBPP_PATH)) for s in SUITES if s.startswith("mbpp")}
    assert sizes == {"mbpp_train": 181, "mbpp_dev": 60, "mbpp_test": 60}
