"""Execution-verified preference pairs from CI outcomes (CodeLutra-style).

A pair is (prompt, chosen, rejected): chosen passed its tests, rejected failed them, for the
same context (the same prompt and suffix, see :func:`trainer.records.context_key`). Sources:

* ``fix``: a completion that failed, paired with the text the developer edited it into and that
  then passed (the most valuable signal: the same intent, before and after);
* ``ci``: any passing text against any failing text of the same context;
* ``resample``: where a context has a runnable test (``tests_for``) but only one side (only
  failures, or only passes), the current policy samples ``n_resample`` more candidates, the
  sandbox runs them, and passes are paired with failures.

Where a test exists every text is run again in the sandbox (:class:`trainer.sandbox.Sandbox`,
the one executor for untrusted code): a pair survives only if its chosen passes and its
rejected fails, and a failure that passes on any of ``flaky_reruns`` re-runs is flaky and
dropped. Without a test the CI verdicts are taken as they are.

Failures that build and then fail the tests teach more than code that does not parse, so
rejected texts are ranked assertion failure > runtime error > syntax error (``compile()`` spots
syntax errors without running anything) and the cap per context keeps the best-ranked pairs.
Everything is deterministic for a given ``seed``: ties are broken by a seeded hash, not by
input order or Python's per-process ``hash``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from server.services.fim import FimFormat
from trainer.records import OutcomeRecord
from trainer.sandbox import RunResult, Sandbox

__all__ = [
    "Context",
    "Pair",
    "PairBuildResult",
    "PairInfo",
    "build_pairs",
    "failure_kind",
    "normalize_text",
]

Source = Literal["fix", "ci", "resample"]
FailureKind = Literal["assertion", "runtime", "syntax"]
Verdict = Literal["pass", "fail", "flaky"]

# Lower sorts first when a context has more pairs than the cap allows.
_SOURCE_PRIORITY: dict[str, int] = {"fix": 0, "ci": 1, "resample": 2}
# Higher is a more instructive rejected text.
_KIND_RANK: dict[str, int] = {"assertion": 3, "runtime": 2, "syntax": 1}
_DROP_REASONS = ("identical", "flaky", "chosen_failed", "rejected_passed", "cap")
_SYNTAX_LAST_LINE = re.compile(r"^(SyntaxError|IndentationError|TabError)\b")
_ASSERTION_LAST_LINE = re.compile(r"^AssertionError\b")
_PYTHON_LANGUAGES = {"python", "py", "python3"}


@dataclass(frozen=True)
class Pair:
    """One preference pair, as the trainer (``trainer.train``) consumes it."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class Context:
    """Everything recorded for one prompt+suffix; what ``tests_for`` is asked about."""

    key: str
    endpoint: str
    prompt: str
    suffix: str | None
    language: str | None
    file_path: str | None
    repository: str | None  # the most frequent among its records
    records: tuple[OutcomeRecord, ...]

    @property
    def model_prompt(self) -> str:
        """The prompt exactly as the model saw it: FIM-formatted when there was a suffix."""
        if self.suffix is not None:
            return FimFormat().build(self.prompt, self.suffix)
        return self.prompt

    def program(self, text: str) -> str:
        """The code a completion ``text`` makes in this context: the prompt, the text, then the
        suffix. A chat prompt is a rendered conversation, so there only the answer is code."""
        if self.endpoint == "chat":
            return text
        return self.prompt + text + (self.suffix or "")

    @property
    def is_python(self) -> bool:
        if self.language is not None:
            return self.language.lower() in _PYTHON_LANGUAGES
        return self.file_path is None or self.file_path.endswith((".py", ".pyi"))


@dataclass(frozen=True)
class PairInfo:
    """Where a pair came from: for selection (repository share) and for inspecting the data."""

    context_key: str
    repository: str | None
    source: str
    rejected_kind: FailureKind


@dataclass
class PairBuildResult:
    pairs: list[Pair]
    info: dict[str, PairInfo]  # by pair id
    funnel: dict[str, Any]

    @property
    def repositories(self) -> dict[str, str | None]:
        """Pair id -> repository, as ``trainer.selection.select_pairs`` takes it."""
        return {pair_id: info.repository for pair_id, info in self.info.items()}


def normalize_text(text: str) -> str:
    """The dedupe key of a text: line endings unified, tabs expanded, trailing whitespace and
    blank lines dropped, runs of blanks inside a line collapsed. Indentation is kept: in Python
    a changed indent is a changed program (and often exactly the fix)."""
    lines = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n"):
        body = line.rstrip()
        if not body:
            continue
        indent = len(body) - len(body.lstrip(" "))
        lines.append(" " * indent + " ".join(body.split()))
    return "\n".join(lines)


def failure_kind(result: RunResult) -> FailureKind:
    """Classify a failed sandbox run by the exception that ended it."""
    last = next((ln for ln in reversed(result.stderr.splitlines()) if ln.strip()), "")
    if _SYNTAX_LAST_LINE.match(last):
        return "syntax"
    if _ASSERTION_LAST_LINE.match(last):
        return "assertion"
    return "runtime"  # other exceptions, timeouts, memory, killed


def _compiles(code: str) -> bool:
    # compile() parses without running anything; pathological input may also raise these.
    try:
        compile(code, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def _with_test(code: str, test: str) -> str:
    # The same program trainer.sandbox.check_program runs, so run_many can batch them.
    return code + "\n\n" + test


def _seeded(seed: int, *parts: str) -> str:
    return hashlib.sha256("\0".join((str(seed), *parts)).encode()).hexdigest()


@dataclass
class _Candidate:
    """One distinct (normalised) text of a context with what is known about it."""

    text: str  # the first exact text seen with this normalised form
    ci_pass: bool = False
    ci_fail: bool = False
    ci_kind: FailureKind = "assertion"  # tests ran and failed: the code at least built
    resampled: bool = False
    verdict: Verdict | None = None  # from the sandbox, where the context has a test
    kind: FailureKind | None = None  # from the sandbox, for failures

    def rank_kind(self) -> FailureKind:
        return self.kind or self.ci_kind


class _Executor:
    """Runs programs in the sandbox once each (cached), re-running failures for flakiness."""

    def __init__(self, sandbox: Sandbox, flaky_reruns: int) -> None:
        self.sandbox = sandbox
        self.flaky_reruns = flaky_reruns
        self.results: dict[str, tuple[Verdict, FailureKind | None]] = {}
        self.runs = 0

    def run(self, programs: Iterable[str]) -> None:
        todo = sorted({p for p in programs if p not in self.results})
        # A program that does not parse fails the same way every time: no sandbox needed.
        runnable = []
        for program in todo:
            if _compiles(program):
                runnable.append(program)
            else:
                self.results[program] = ("fail", "syntax")
        first = self._run_many(runnable)
        failed = [p for p, r in zip(runnable, first, strict=True) if not r.passed]
        for program, result in zip(runnable, first, strict=True):
            if result.passed:
                self.results[program] = ("pass", None)
            else:
                self.results[program] = ("fail", failure_kind(result))
        for _ in range(self.flaky_reruns):
            again = self._run_many(failed)
            for program, result in zip(failed, again, strict=True):
                if result.passed:
                    self.results[program] = ("flaky", None)
            failed = [p for p in failed if self.results[p][0] == "fail"]

    def _run_many(self, programs: Sequence[str]) -> list[RunResult]:
        self.runs += len(programs)
        return self.sandbox.run_many(programs) if programs else []


def _contexts(records: Sequence[OutcomeRecord]) -> list[Context]:
    grouped: dict[str, list[OutcomeRecord]] = defaultdict(list)
    for record in records:
        grouped[record.context_key].append(record)
    contexts = []
    for key in sorted(grouped):
        group = grouped[key]
        repos = Counter(r.repository for r in group if r.repository is not None)
        # Most frequent, ties by name, so the choice does not depend on input order.
        repository = min(repos, key=lambda r: (-repos[r], r)) if repos else None
        first = group[0]
        contexts.append(
            Context(
                key=key,
                endpoint=first.endpoint,
                prompt=first.prompt,
                suffix=first.suffix,
                language=next((r.language for r in group if r.language), None),
                file_path=next((r.file_path for r in group if r.file_path), None),
                repository=repository,
                records=tuple(group),
            )
        )
    return contexts


def _candidates(context: Context) -> tuple[dict[str, _Candidate], set[tuple[str, str]], int]:
    """Distinct texts of a context keyed by normalised text, the (failed, fixed) key pairs,
    and how many recorded texts were duplicates of one seen before."""
    candidates: dict[str, _Candidate] = {}
    fixes: set[tuple[str, str]] = set()
    duplicates = 0

    def add(text: str) -> _Candidate:
        nonlocal duplicates
        key = normalize_text(text)
        if key in candidates:
            duplicates += 1
        else:
            candidates[key] = _Candidate(text=text)
        return candidates[key]

    for record in context.records:
        if record.passed:
            add(record.final_text).ci_pass = True
        elif record.failed:
            candidate = add(record.final_text)
            candidate.ci_fail = True
            if record.status == "build_failed":
                candidate.ci_kind = "syntax"  # collection failed: the code did not build
            if record.fixed_text is not None:
                # The fix passed in CI too (its own record says so, unless that one is outside
                # the loaded window).
                add(record.fixed_text).ci_pass = True
                fixes.add((normalize_text(record.final_text), normalize_text(record.fixed_text)))
    if context.is_python:
        for candidate in candidates.values():
            if candidate.ci_fail and not _compiles(context.program(candidate.text)):
                candidate.ci_kind = "syntax"
    return candidates, fixes, duplicates


@dataclass
class _Proposal:
    chosen: str  # normalised keys into the context's candidates
    rejected: str
    source: Source


def _propose(candidates: dict[str, _Candidate], fixes: set[tuple[str, str]]) -> list[_Proposal]:
    """Every chosen x rejected of a context. Recorded texts take their side from CI (the
    sandbox may only veto them, in :func:`_drop_reason`); resampled ones from the sandbox."""
    chosen = [
        k for k, c in candidates.items() if c.ci_pass or (c.resampled and c.verdict == "pass")
    ]
    rejected = [
        k
        for k, c in candidates.items()
        if c.ci_fail or (c.resampled and c.verdict in ("fail", "flaky"))
    ]
    proposals = []
    for r in sorted(rejected):
        for c in sorted(chosen):
            source: Source = (
                "resample"
                if candidates[c].resampled or candidates[r].resampled
                else "fix"
                if (r, c) in fixes
                else "ci"
            )
            proposals.append(_Proposal(chosen=c, rejected=r, source=source))
    return proposals


def _drop_reason(p: _Proposal, candidates: dict[str, _Candidate], verified: bool) -> str | None:
    if p.chosen == p.rejected:
        return "identical"
    chosen, rejected = candidates[p.chosen], candidates[p.rejected]
    # A text CI saw both pass and fail is flaky whatever the sandbox says.
    if (chosen.ci_pass and chosen.ci_fail) or (rejected.ci_pass and rejected.ci_fail):
        return "flaky"
    if not verified:
        return None
    if chosen.verdict == "flaky" or rejected.verdict == "flaky":
        return "flaky"
    if chosen.verdict != "pass":
        return "chosen_failed"
    if rejected.verdict != "fail":
        return "rejected_passed"
    return None


def _cap(
    proposals: list[_Proposal],
    candidates: dict[str, _Candidate],
    limit: int,
    seed: int,
) -> tuple[list[_Proposal], int]:
    """Keep at most ``limit`` proposals: fixes first, then CI pairs, then resampled ones; within
    each source by rejected kind, ties by a seeded hash, and pairs whose texts are not used yet
    before the rest, so the kept pairs cover more distinct texts."""

    def order(p: _Proposal) -> tuple[int, int, str]:
        kind = candidates[p.rejected].rank_kind()
        return (_SOURCE_PRIORITY[p.source], -_KIND_RANK[kind], _seeded(seed, p.chosen, p.rejected))

    kept: list[_Proposal] = []
    used: set[str] = set()
    for source in sorted(_SOURCE_PRIORITY, key=_SOURCE_PRIORITY.__getitem__):
        tier = sorted((p for p in proposals if p.source == source), key=order)
        fresh = []
        for p in tier:
            if p.chosen not in used and p.rejected not in used:
                fresh.append(p)
                used.update((p.chosen, p.rejected))
        kept += fresh + [p for p in tier if p not in fresh]
    return kept[:limit], max(0, len(kept) - limit)


def build_pairs(
    records: Sequence[OutcomeRecord],
    *,
    sandbox: Sandbox,
    tests_for: Callable[[Context], str | None] | None = None,
    resample: Callable[[str, str | None, int], list[str]] | None = None,
    resample_batch: Callable[[Sequence[tuple[str, str | None]], int], list[list[str]]]
    | None = None,
    n_resample: int = 8,
    flaky_reruns: int = 1,
    max_pairs_per_context: int = 4,
    seed: int = 0,
) -> PairBuildResult:
    """Preference pairs from outcome records (see the module docstring for the rules).

    ``tests_for(context)`` returns test code (asserts run after the program) for contexts that
    have one, else None. ``resample(prompt, suffix, n)`` returns ``n`` completions of the
    current policy for a context (prompt: the text before the cursor; suffix: after it, None
    for plain prompts). ``resample_batch(contexts, n)``, where given, does the same for many
    (prompt, suffix) at once, which an inference engine serves far faster than one at a time.
    Sandbox runs are batched across contexts (``Sandbox.run_many``).
    """
    if max_pairs_per_context < 1:
        raise ValueError(f"max_pairs_per_context must be at least 1: {max_pairs_per_context}")
    if flaky_reruns < 0 or n_resample < 0:
        raise ValueError("flaky_reruns and n_resample must not be negative")
    # Sorted so that representatives, tie-breaks and output never depend on the input order.
    usable = sorted(
        (r for r in records if r.passed or r.failed),
        key=lambda r: (r.context_key, r.received_at, r.run_id, r.completion_id, r.choice_index),
    )
    contexts = _contexts(usable)
    executor = _Executor(sandbox, flaky_reruns)
    dropped: Counter[str] = Counter({reason: 0 for reason in _DROP_REASONS})

    states = []
    duplicate_texts = 0
    for context in contexts:
        candidates, fixes, duplicates = _candidates(context)
        duplicate_texts += duplicates
        test = tests_for(context) if tests_for is not None else None
        states.append((context, candidates, fixes, test))

    # Verify every text of every context that has a test, all in one batch.
    def verify(items: Iterable[tuple[Context, dict[str, _Candidate], str]]) -> None:
        wanted = [
            (c, _with_test(ctx.program(c.text), test))
            for ctx, candidates, test in items
            for c in candidates.values()
            if c.verdict is None
        ]
        executor.run(program for _, program in wanted)
        for candidate, program in wanted:
            candidate.verdict, candidate.kind = executor.results[program]

    verify((ctx, cands, test) for ctx, cands, _, test in states if test is not None)

    # Resample where a tested context lacks a verified side.
    to_resample = []
    for context, candidates, _fixes, test in states:
        if test is None or (resample is None and resample_batch is None) or n_resample == 0:
            continue
        has_pass = any(c.ci_pass and c.verdict == "pass" for c in candidates.values())
        has_fail = any(c.ci_fail and c.verdict == "fail" for c in candidates.values())
        if has_pass and has_fail:
            continue
        to_resample.append((context, candidates, test))
    resampled = 0
    if resample_batch is not None:
        asks = [(context.prompt, context.suffix) for context, _, _ in to_resample]
        samples = resample_batch(asks, n_resample) if asks else []
    else:
        assert resample is not None or not to_resample
        samples = [resample(c.prompt, c.suffix, n_resample) for c, _, _ in to_resample]  # type: ignore[misc]
    for (_context, candidates, _test), texts in zip(to_resample, samples, strict=True):
        for text in texts[:n_resample]:
            key = normalize_text(text)
            if key and key not in candidates:
                candidates[key] = _Candidate(text=text, resampled=True)
                resampled += 1
    verify(to_resample)

    pairs: list[Pair] = []
    info: dict[str, PairInfo] = {}
    contexts_with_pairs = 0
    by_source: Counter[str] = Counter({source: 0 for source in _SOURCE_PRIORITY})
    for context, candidates, fixes, test in states:
        kept = []
        for p in _propose(candidates, fixes):
            reason = _drop_reason(p, candidates, verified=test is not None)
            if reason is None:
                kept.append(p)
            else:
                dropped[reason] += 1
        kept, over = _cap(kept, candidates, max_pairs_per_context, seed)
        dropped["cap"] += over
        contexts_with_pairs += bool(kept)
        prompt = context.model_prompt
        for p in kept:
            chosen, rejected = candidates[p.chosen], candidates[p.rejected]
            pair_id = hashlib.sha256(
                f"{prompt}\0{chosen.text}\0{rejected.text}".encode()
            ).hexdigest()[:24]
            pairs.append(
                Pair(
                    id=pair_id,
                    prompt=prompt,
                    chosen=chosen.text,
                    rejected=rejected.text,
                    source=p.source,
                )
            )
            info[pair_id] = PairInfo(
                context_key=context.key,
                repository=context.repository,
                source=p.source,
                rejected_kind=rejected.rank_kind(),
            )
            by_source[p.source] += 1

    funnel: dict[str, Any] = {
        "records": len(records),
        "records_with_verdict": len(usable),
        "duplicate_texts": duplicate_texts,
        "contexts": len(contexts),
        "contexts_with_tests": sum(1 for *_, test in states if test is not None),
        "contexts_resampled": len(to_resample),
        "contexts_with_pairs": contexts_with_pairs,
        "resampled_candidates": resampled,
        "sandbox_runs": executor.runs,
        "pairs_by_source": dict(by_source),
        "dropped": dict(dropped),
        "pairs": len(pairs),
    }
    return PairBuildResult(pairs=pairs, info=info, funnel=funnel)
