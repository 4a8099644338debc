"""The GRPO reward of one completion, as pure numbers: format + sealed outcome + gated process.

Posterior-GRPO's rule: a process reward (here the judge's score, :mod:`trainer.judge`) given
without a passing outcome gets hacked: the policy learns to please the judge and the pass rate
stays flat. Gated on the sealed outcome it is only a tie-break among passing completions:

    R = w_format * format + w_outcome * outcome + 1[outcome] * w_process * process

``outcome`` is the sandbox's sealed verdict (:meth:`trainer.sandbox.Sandbox.run_test`: passed
only when the test ran to its end), never the judge's opinion. :attr:`RewardRule.gated` False
gives the ungated ``format + outcome + process``, which exists only to show the difference
(``benchmarks/grpo_gating.py``).

Nothing here loads a model or runs code, so the rule is tested without either.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Components", "RewardRule", "cut_at_stops", "format_ok"]


@dataclass(frozen=True)
class Components:
    """What one completion earned, before weighting.

    ``format``: it ended by itself and its program parses (:func:`format_ok`); ``passed``: the
    sealed verdict; ``process``: the judge's score in [0, 1], None when it was not asked (a
    gated rule does not ask about failing completions) or gave no parseable answer."""

    format: bool
    passed: bool
    process: float | None

    def __post_init__(self) -> None:
        if self.process is not None and not 0.0 <= self.process <= 1.0:
            raise ValueError(f"process must be in [0, 1] or None, got {self.process!r}")


@dataclass(frozen=True)
class RewardRule:
    """How components become one reward (see the module docstring)."""

    gated: bool = True
    format_weight: float = 1.0
    outcome_weight: float = 1.0
    process_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("format_weight", "outcome_weight", "process_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def needs_process(self, passed: bool) -> bool:
        """Whether the judge's score can change this completion's reward: gated, only a passing
        completion's can, so failing ones are never sent to the judge."""
        return self.process_weight > 0 and (passed or not self.gated)

    def reward(self, c: Components) -> float:
        process = c.process if c.process is not None and self.needs_process(c.passed) else 0.0
        return (
            self.format_weight * float(c.format)
            + self.outcome_weight * float(c.passed)
            + self.process_weight * process
        )

    def rewards(self, components: Sequence[Components]) -> list[float]:
        return [self.reward(c) for c in components]


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest of ``stops`` (as the server would have stopped it), and
    whether any stop was found."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def format_ok(program: str, *, ended: bool) -> bool:
    """The format reward: the completion ended by itself (a stop string or end token, not the
    length limit) and the program it makes parses as Python."""
    if not ended:
        return False
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True
