"""Preference pairs from outcome records: each pairing rule, sandbox verification, flakiness,
ranking of failures, dedupe, the per-context cap, resampling and determinism.

The sandbox is the real one (runs take ~50 ms); a wrapper scripts flakiness deterministically.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server.services.fim import FimFormat
from trainer.pairs import Context, build_pairs, normalize_text
from trainer.records import OutcomeRecord, context_key
from trainer.sandbox import RunResult, Sandbox, SandboxLimits

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n"
TEST = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
GOOD = "return a + b"
GOOD_2 = "return b + a"
GOOD_3 = "result = a + b\n    return result"
ASSERTION = "return a - b"  # builds, fails the asserts
ASSERTION_2 = "return a * b"
RUNTIME = "return c"  # NameError
SYNTAX = "return a +"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=5))


class CountingSandbox:
    """The real sandbox, counting runs; programs containing ``# FLAKY`` fail on their first
    run and pass afterwards."""

    def __init__(self, real: Sandbox) -> None:
        self.real = real
        self.programs: list[str] = []
        self._seen: set[str] = set()

    def run_many(self, programs: Sequence[str], *, progress: bool = False) -> list[RunResult]:
        self.programs += programs
        rewritten = []
        for program in programs:
            first_time = program not in self._seen
            self._seen.add(program)
            if "# FLAKY" in program and first_time:
                program = "raise AssertionError('flaky')\n"
            rewritten.append(program)
        return self.real.run_many(rewritten)


_counter = 0


def rec(
    text: str,
    status: str,
    *,
    prompt: str = PREFIX,
    suffix: str | None = SUFFIX,
    fixed_text: str | None = None,
    repository: str | None = "github.com/acme/app",
    minutes: int | None = None,
) -> OutcomeRecord:
    global _counter
    _counter += 1
    return OutcomeRecord(
        completion_id=f"cmpl-{_counter}",
        choice_index=0,
        context_key=context_key(prompt, suffix),
        endpoint="completions",
        prompt=prompt,
        suffix=suffix,
        language="python",
        completion_text=text,
        final_text=text,
        status=status,
        run_id=f"ci:{_counter}",
        repository=repository,
        file_path="src/app/util.py",
        adapter=None,
        received_at=T0 + timedelta(minutes=_counter if minutes is None else minutes),
        fixed_text=fixed_text,
    )


def with_test(context: Context) -> str:
    return TEST


def triples(result) -> set[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return {(p.chosen, p.rejected, p.source) for p in result.pairs}


# -- pairing rules ----------------------------------------------------------------------------


def test_pass_vs_fail_of_the_same_context(sandbox: Sandbox) -> None:
    records = [
        rec(GOOD, "passed"),
        rec(ASSERTION, "failed"),
        # Another context: never paired with the first.
        rec("return a", "failed", prompt="def first(a):\n    "),
        rec("return x", "passed", prompt="def other(x):\n    "),
    ]
    result = build_pairs(records, sandbox=sandbox)
    assert triples(result) == {(GOOD, ASSERTION, "ci")}
    (pair,) = result.pairs
    # FIM contexts: the prompt is the model's FIM prompt.
    assert pair.prompt == FimFormat().build(PREFIX, SUFFIX)
    assert result.info[pair.id].repository == "github.com/acme/app"
    assert result.info[pair.id].rejected_kind == "assertion"
    assert result.funnel["contexts"] == 3 and result.funnel["contexts_with_pairs"] == 1
    assert result.funnel["pairs_by_source"] == {"fix": 0, "ci": 1, "resample": 0}


def test_plain_prompt_is_the_prompt_text(sandbox: Sandbox) -> None:
    prompt = "def add(a, b):\n"
    records = [rec("    return a + b\n", "passed", prompt=prompt, suffix=None),
               rec("    return a - b\n", "failed", prompt=prompt, suffix=None)]  # fmt: skip
    (pair,) = build_pairs(records, sandbox=sandbox, tests_for=with_test).pairs
    assert pair.prompt == prompt


def test_failure_then_fix(sandbox: Sandbox) -> None:
    records = [
        rec(ASSERTION, "failed", fixed_text=GOOD),
        rec(GOOD, "passed"),  # the fix's own outcome
        # A fix whose passing outcome is not among the records still pairs.
        rec("return x - 1", "failed", prompt="def inc(x):\n    ", fixed_text="return x + 1"),
    ]
    result = build_pairs(records, sandbox=sandbox)
    assert triples(result) == {(GOOD, ASSERTION, "fix"), ("return x + 1", "return x - 1", "fix")}
    assert result.funnel["pairs_by_source"]["fix"] == 2
    assert result.funnel["duplicate_texts"] == 1  # GOOD as the fix and as its own record


def test_fix_pairs_come_first_under_the_cap(sandbox: Sandbox) -> None:
    records = [
        rec(GOOD_2, "passed"),
        rec(ASSERTION_2, "failed"),
        rec(ASSERTION, "failed", fixed_text=GOOD),
    ]
    result = build_pairs(records, sandbox=sandbox, max_pairs_per_context=1)
    assert triples(result) == {(GOOD, ASSERTION, "fix")}


def test_fixes_to_the_same_text_all_beat_ci_pairs_under_the_cap(sandbox: Sandbox) -> None:
    records = [
        rec(ASSERTION, "failed", fixed_text=GOOD),
        rec(ASSERTION_2, "failed", fixed_text=GOOD),  # fixed into the same text
        rec(GOOD_2, "passed"),
        rec(RUNTIME, "failed"),
    ]
    result = build_pairs(records, sandbox=sandbox, max_pairs_per_context=2)
    assert triples(result) == {(GOOD, ASSERTION, "fix"), (GOOD, ASSERTION_2, "fix")}


def test_error_status_is_no_verdict(sandbox: Sandbox) -> None:
    result = build_pairs([rec(GOOD, "passed"), rec(ASSERTION, "error")], sandbox=sandbox)
    assert result.pairs == []
    assert result.funnel["records"] == 2 and result.funnel["records_with_verdict"] == 1


# -- verification -----------------------------------------------------------------------------


def test_verification_drops_a_chosen_that_fails_and_a_rejected_that_passes(
    sandbox: Sandbox,
) -> None:
    records = [
        rec(GOOD, "passed"),
        rec(ASSERTION_2, "passed"),  # CI said passed; the test says otherwise
        rec(ASSERTION, "failed"),
        rec(GOOD_2, "failed"),  # CI said failed; the test passes it
    ]
    counting = CountingSandbox(sandbox)
    result = build_pairs(records, sandbox=counting, tests_for=with_test)  # type: ignore[arg-type]
    assert triples(result) == {(GOOD, ASSERTION, "ci")}
    assert result.funnel["dropped"]["chosen_failed"] == 2  # ASSERTION_2 x both rejected
    assert result.funnel["dropped"]["rejected_passed"] == 1  # GOOD x GOOD_2
    # Each distinct text once, plus one re-run of each failure (flaky_reruns=1).
    assert len(counting.programs) == 4 + 2
    assert result.funnel["sandbox_runs"] == 6


def test_without_tests_ci_verdicts_stand(sandbox: Sandbox) -> None:
    records = [rec(ASSERTION_2, "passed"), rec(GOOD_2, "failed")]
    counting = CountingSandbox(sandbox)
    result = build_pairs(records, sandbox=counting)  # type: ignore[arg-type]
    assert triples(result) == {(ASSERTION_2, GOOD_2, "ci")}
    assert counting.programs == []


def test_flaky_failure_is_dropped(sandbox: Sandbox) -> None:
    flaky = "return a + b  # FLAKY"  # fails its first run only
    records = [rec(GOOD, "passed"), rec(flaky, "failed"), rec(ASSERTION, "failed")]
    scripted: Any = CountingSandbox(sandbox)
    result = build_pairs(records, sandbox=scripted, tests_for=with_test)
    assert triples(result) == {(GOOD, ASSERTION, "ci")}
    assert result.funnel["dropped"]["flaky"] == 1

    # Without re-runs the flakiness goes unnoticed: the failure counts as one.
    result = build_pairs(
        records,
        sandbox=CountingSandbox(sandbox),  # type: ignore[arg-type]
        tests_for=with_test,
        flaky_reruns=0,
    )
    assert triples(result) == {(GOOD, ASSERTION, "ci"), (GOOD, flaky, "ci")}


def test_text_that_both_passed_and_failed_in_ci_is_dropped(sandbox: Sandbox) -> None:
    records = [
        rec(GOOD, "passed"),
        rec(ASSERTION, "failed"),
        rec(ASSERTION, "passed"),  # the same text passed another run: flaky CI
    ]
    result = build_pairs(records, sandbox=sandbox)
    assert result.pairs == []
    assert result.funnel["dropped"]["identical"] == 1  # ASSERTION vs itself
    assert result.funnel["dropped"]["flaky"] == 1  # GOOD vs ASSERTION


# -- ranking, dedupe, cap ---------------------------------------------------------------------


def test_assertion_failures_rank_above_runtime_above_syntax(sandbox: Sandbox) -> None:
    records = [rec(GOOD, "passed"), rec(SYNTAX, "failed"), rec(RUNTIME, "failed"),
               rec(ASSERTION, "failed")]  # fmt: skip
    result = build_pairs(records, sandbox=sandbox, tests_for=with_test)
    assert [p.rejected for p in result.pairs] == [ASSERTION, RUNTIME, SYNTAX]
    assert [result.info[p.id].rejected_kind for p in result.pairs] == [
        "assertion",
        "runtime",
        "syntax",
    ]
    (best,) = build_pairs(
        records, sandbox=sandbox, tests_for=with_test, max_pairs_per_context=1
    ).pairs
    assert best.rejected == ASSERTION


def test_syntax_errors_rank_last_without_tests_too(sandbox: Sandbox) -> None:
    """compile() spots them without the sandbox; CI's build_failed means the same."""
    records = [rec(GOOD, "passed"), rec(SYNTAX, "failed"), rec("return a // b", "build_failed"),
               rec(ASSERTION, "failed")]  # fmt: skip
    counting = CountingSandbox(sandbox)
    result = build_pairs(records, sandbox=counting)  # type: ignore[arg-type]
    assert counting.programs == []
    assert result.pairs[0].rejected == ASSERTION
    assert {result.info[p.id].rejected_kind for p in result.pairs[1:]} == {"syntax"}


def test_whitespace_variants_are_one_text(sandbox: Sandbox) -> None:
    records = [
        rec(GOOD, "passed"),
        rec(ASSERTION, "failed"),
        rec("return  a - b   \n\n", "failed"),  # the same failure, other whitespace
        rec("return a + b\r\n", "passed"),
    ]
    result = build_pairs(records, sandbox=sandbox, tests_for=with_test)
    assert triples(result) == {(GOOD, ASSERTION, "ci")}
    assert result.funnel["duplicate_texts"] == 2


def test_normalize_text_keeps_indentation() -> None:
    assert normalize_text("x  =  1  \r\n\n\ty = 2\n") == "x = 1\n    y = 2"
    # Moving a return out of a loop is a different program (often exactly the fix).
    inside = "for v in xs:\n    total += v\n    return total"
    outside = "for v in xs:\n    total += v\nreturn total"
    assert normalize_text(inside) != normalize_text(outside)


def test_cap_per_context_prefers_unused_texts(sandbox: Sandbox) -> None:
    passes = [GOOD, GOOD_2, GOOD_3]
    fails = [ASSERTION, ASSERTION_2, "return a ** b"]
    records = [rec(t, "passed") for t in passes] + [rec(t, "failed") for t in fails]
    result = build_pairs(records, sandbox=sandbox, max_pairs_per_context=4)
    assert len(result.pairs) == 4
    assert result.funnel["dropped"]["cap"] == 9 - 4
    # The first three cover every text once before any text is reused.
    first = result.pairs[:3]
    assert {p.chosen for p in first} == set(passes)
    assert {p.rejected for p in first} == set(fails)
    assert len({p.id for p in result.pairs}) == 4


def test_deterministic_whatever_the_input_order(sandbox: Sandbox) -> None:
    records = [rec(t, "passed") for t in (GOOD, GOOD_2, GOOD_3)] + [
        rec(t, "failed") for t in (ASSERTION, ASSERTION_2, "return a ** b")
    ]
    records += [rec("return x", "passed", prompt="def g(x):\n    "),
                rec("return -x", "failed", prompt="def g(x):\n    ")]  # fmt: skip
    expected = build_pairs(records, sandbox=sandbox, max_pairs_per_context=2, seed=3).pairs
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    again = build_pairs(shuffled, sandbox=sandbox, max_pairs_per_context=2, seed=3).pairs
    assert again == expected


# -- resampling -------------------------------------------------------------------------------


class StubPolicy:
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.calls: list[tuple[str, str | None, int]] = []

    def __call__(self, prompt: str, suffix: str | None, n: int) -> list[str]:
        self.calls.append((prompt, suffix, n))
        return self.texts[:n]


def test_resampling_a_context_with_only_failures(sandbox: Sandbox) -> None:
    policy = StubPolicy([GOOD, "return  a + b", ASSERTION_2, SYNTAX])
    records = [rec(ASSERTION, "failed")]
    result = build_pairs(
        records, sandbox=sandbox, tests_for=with_test, resample=policy, n_resample=4
    )
    assert policy.calls == [(PREFIX, SUFFIX, 4)]
    assert triples(result) == {
        (GOOD, ASSERTION, "resample"),  # the user's real failure, against a sampled pass
        (GOOD, ASSERTION_2, "resample"),
        (GOOD, SYNTAX, "resample"),
    }
    assert result.pairs[-1].rejected == SYNTAX  # ranked last
    assert result.funnel["contexts_resampled"] == 1
    assert result.funnel["resampled_candidates"] == 3  # the whitespace variant is a duplicate


def test_resampling_a_context_with_only_passes(sandbox: Sandbox) -> None:
    policy = StubPolicy([RUNTIME, GOOD_2])
    result = build_pairs(
        [rec(GOOD, "passed")], sandbox=sandbox, tests_for=with_test, resample=policy
    )
    assert triples(result) == {(GOOD, RUNTIME, "resample"), (GOOD_2, RUNTIME, "resample")}


def test_no_resampling_without_a_test_or_with_both_sides(sandbox: Sandbox) -> None:
    policy = StubPolicy([GOOD])
    build_pairs([rec(ASSERTION, "failed")], sandbox=sandbox, resample=policy)
    both = [rec(GOOD_2, "passed"), rec(ASSERTION, "failed")]
    result = build_pairs(both, sandbox=sandbox, tests_for=with_test, resample=policy)
    assert policy.calls == []
    assert triples(result) == {(GOOD_2, ASSERTION, "ci")}


def test_tests_for_sees_the_context(sandbox: Sandbox) -> None:
    seen: list[Context] = []

    def tests_for(context: Context) -> str | None:
        seen.append(context)
        return TEST if context.prompt == PREFIX else None

    records = [rec(GOOD, "passed"), rec(ASSERTION, "failed"),
               rec("return x", "passed", prompt="def g(x):\n    ")]  # fmt: skip
    result = build_pairs(records, sandbox=sandbox, tests_for=tests_for)
    assert {c.prompt for c in seen} == {PREFIX, "def g(x):\n    "}
    ctx = next(c for c in seen if c.prompt == PREFIX)
    assert ctx.suffix == SUFFIX and len(ctx.records) == 2
    assert ctx.program(GOOD) == PREFIX + GOOD + SUFFIX
    assert result.funnel["contexts_with_tests"] == 1


def test_bad_arguments(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError):
        build_pairs([], sandbox=sandbox, max_pairs_per_context=0)
    empty = build_pairs([], sandbox=sandbox)
    assert empty.pairs == [] and empty.funnel["pairs"] == 0
