"""Execution benchmarks: greedy pass@1 of the base model or an adapter on a fixed task list, and
the paired comparison (exact McNemar test) that the evaluation gate decides on. Beside pass@1,
the executability rate: the share of completions whose program (without its test) parses,
resolves its imports and API use and runs (:mod:`trainer.executability`); a passing completion
is executable by its verdict, so only the failing ones are checked.

Every completion is judged in the :class:`~trainer.sandbox.Sandbox` (``run_tests``):
``task.program(completion)`` followed by ``task.test``; it passes only when the test ran to its
end (a program that exits early or tampers with the test is ``flagged``, never passed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any, Protocol

from trainer.executability import check_programs, executability_rate
from trainer.generate import GenerationRequest
from trainer.sandbox import Sandbox
from trainer.tasks import Task, load_humaneval, load_humaneval_single_line, load_mbpp

__all__ = [
    "SUITES",
    "Comparison",
    "EvalResult",
    "Generator",
    "compare",
    "evaluate",
    "load_suite",
    "mcnemar_exact",
]

log = logging.getLogger(__name__)

SUITES: dict[str, Callable[[Path], list[Task]]] = {
    "mbpp_train": lambda path: load_mbpp(path, "train"),
    "mbpp_dev": lambda path: load_mbpp(path, "dev"),
    "mbpp_test": lambda path: load_mbpp(path, "test"),
    "humaneval": lambda _: load_humaneval(),
    "humaneval_fim": lambda _: load_humaneval_single_line(),
}


def load_suite(name: str, *, mbpp_path: Path) -> list[Task]:
    """The tasks of the benchmark ``name`` (one of :data:`SUITES`); ``mbpp_path`` is the MBPP+
    JSONL file, used by the ``mbpp_*`` suites only."""
    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; the suites are: {', '.join(SUITES)}.")
    return SUITES[name](Path(mbpp_path))


class Generator(Protocol):
    """Anything that generates like :meth:`trainer.generate.VllmGenerator.generate`."""

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        adapter: str | Path | None = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = 0,
        progress: bool = False,
    ) -> list[list[str]]: ...


@dataclass
class EvalResult:
    suite: str  # e.g. "mbpp_test", "humaneval", "humaneval_fim"
    adapter: str | None  # adapter path, or None for the base model
    task_ids: list[str]
    passed: list[bool]
    completions: list[str]
    duration_s: float
    # Per task: the completion's program is executable (a pass is, by its verdict); None for a
    # run that did not check (``evaluate(..., executability=False)``).
    executable: list[bool] | None = None

    @property
    def pass_at_1(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def executability_rate(self) -> float | None:
        """The share of executable completions; None when it was not checked."""
        return executability_rate(self.executable) if self.executable is not None else None

    def to_json(self) -> dict[str, Any]:
        executable = self.executable or [None] * len(self.task_ids)
        return {
            "suite": self.suite,
            "adapter": self.adapter,
            "n": len(self.task_ids),
            "passed": sum(self.passed),
            "pass_at_1": self.pass_at_1,
            "executability_rate": self.executability_rate,
            "duration_s": self.duration_s,
            "tasks": [
                {"task_id": t, "passed": p, "completion": c, "executable": e}
                for t, p, c, e in zip(
                    self.task_ids, self.passed, self.completions, executable, strict=True
                )
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        tasks = data["tasks"]
        checked = bool(tasks) and all(t.get("executable") is not None for t in tasks)
        return cls(
            suite=data["suite"],
            adapter=data["adapter"],
            task_ids=[t["task_id"] for t in tasks],
            passed=[bool(t["passed"]) for t in tasks],
            completions=[t["completion"] for t in tasks],
            duration_s=float(data["duration_s"]),
            executable=[bool(t["executable"]) for t in tasks] if checked else None,
        )


def _program(task: Task, completion: str) -> tuple[str, str]:
    """The (code, test) the sandbox judges: it puts the test after the code itself and counts
    a pass only if the test ran to its end (``Sandbox.run_test``)."""
    return task.program(completion), task.test


def evaluate(
    generator: Generator,
    tasks: Sequence[Task],
    *,
    suite: str,
    sandbox: Sandbox,
    adapter: str | Path | None = None,
    max_tokens: int = 384,
    progress: bool = True,
    executability: bool = True,
) -> EvalResult:
    """Greedy pass@1 of ``adapter`` (None: the base model) on ``tasks``: one completion per task
    (temperature 0), each program run in ``sandbox``. With ``executability`` each failing
    completion's program (without its test) is checked too, one more sandbox run each."""
    started = time.perf_counter()
    requests = [GenerationRequest(t.prompt, t.suffix, t.single_line) for t in tasks]
    outputs = generator.generate(
        requests,
        adapter=adapter,
        n=1,
        temperature=0.0,
        max_tokens=max_tokens,
        seed=0,
        progress=progress,
    )
    completions = [texts[0] for texts in outputs]
    runs = sandbox.run_tests(
        [_program(t, c) for t, c in zip(tasks, completions, strict=True)], progress=progress
    )
    passed = [r.passed for r in runs]
    executable: list[bool] | None = None
    if executability:
        # A sealed pass is executable by its verdict; the check never overrides it.
        failing = [i for i, p in enumerate(passed) if not p]
        checks = check_programs(
            [tasks[i].program(completions[i]) for i in failing], sandbox=sandbox
        )
        executable = list(passed)
        for i, check in zip(failing, checks, strict=True):
            executable[i] = check.executable
    result = EvalResult(
        suite=suite,
        adapter=str(adapter) if adapter is not None else None,
        task_ids=[t.task_id for t in tasks],
        passed=passed,
        completions=completions,
        duration_s=time.perf_counter() - started,
        executable=executable,
    )
    log.info(
        "event=evaluated suite=%s adapter=%s n=%d passed=%d pass_at_1=%.4f "
        "executability_rate=%s duration_s=%.1f",
        suite,
        result.adapter,
        len(tasks),
        sum(result.passed),
        result.pass_at_1,
        result.executability_rate,
        result.duration_s,
    )
    return result


@dataclass(frozen=True)
class Comparison:
    suite: str
    n: int
    base_passed: int
    candidate_passed: int
    wins: int  # the candidate passes, the base fails
    losses: int  # the base passes, the candidate fails
    p_value: float  # exact two-sided McNemar test on (wins, losses)

    @property
    def delta_points(self) -> float:
        """The candidate's pass@1 minus the base's, in percentage points."""
        return (self.candidate_passed - self.base_passed) / self.n * 100 if self.n else 0.0


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``wins`` among the ``wins + losses``
    discordant tasks against 1/2 (the tasks both pass or both fail carry no information)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be non-negative: {wins}, {losses}")
    n = wins + losses
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1))
    # Exact rationals: 0.5**n underflows long before comb() gets large.
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def compare(base: EvalResult, candidate: EvalResult) -> Comparison:
    """Paired comparison of two runs of the same suite on the same tasks in the same order."""
    if base.suite != candidate.suite:
        raise ValueError(f"Cannot compare suite {base.suite!r} with suite {candidate.suite!r}.")
    if base.task_ids != candidate.task_ids:
        raise ValueError(
            f"The runs of {base.suite!r} differ in their tasks ({len(base.task_ids)} vs "
            f"{len(candidate.task_ids)}, or in another order); compare runs of the same task list."
        )
    for result in (base, candidate):
        if len(result.passed) != len(result.task_ids):
            raise ValueError(
                f"The run of {result.suite!r} (adapter {result.adapter}) has "
                f"{len(result.passed)} results for {len(result.task_ids)} tasks."
            )
    pairs = list(zip(base.passed, candidate.passed, strict=True))
    wins = sum(1 for b, c in pairs if c and not b)
    losses = sum(1 for b, c in pairs if b and not c)
    return Comparison(
        suite=base.suite,
        n=len(pairs),
        base_passed=sum(base.passed),
        candidate_passed=sum(candidate.passed),
        wins=wins,
        losses=losses,
        p_value=mcnemar_exact(wins, losses),
    )
