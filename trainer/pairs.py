"""Execution-verified preference pairs from CI outcomes (CodeLutra-style).

A pair is (prompt, chosen, rejected): chosen passed its tests, rejected failed them, for the
same context (the same prompt and suffix, see :func:`trainer.records.context_key`). Sources:

* ``fix``: a completion that failed, paired with the text the developer edited it into and that
  then passed (the most valuable signal: the same intent, before and after);
* ``ci``: any passing text against any failing text of the same context;
* ``resample``: where a context has a runnable test (``tests_for``) but only one side (only
  failures, or only passes), the current policy samples ``n_resample`` more candidates, the
  sandbox runs them, and passes are paired with failures.
* ``ci_resample``: a text that CI-side exploration (``plugins/PROTOCOL.md``, "Exploration")
  sampled for a served completion's context and judged with the project's own tests, paired
  with a text of the other side of the same context (the served one or another alternative).
  Its verdict comes from CI, as a ``ci`` pair's does: no test code is needed.
* ``judge``: among alternatives of one context that nothing executed (no CI verdict on any text
  of the context), a text the judge model called correct against one it called wrong
  (:func:`build_judge_pairs`, :mod:`trainer.judge`). Weighted below execution pairs, capped per
  round, made only when the judge's measured agreement with sealed verdicts clears a threshold,
  and never for a context that has a verdict: a sealed verdict is never overridden.

Where a test exists every text is run again in the sandbox (:class:`trainer.sandbox.Sandbox`,
the one executor for untrusted code): a pair survives only if its chosen passes and its
rejected fails, and a failure that passes on any of ``flaky_reruns`` re-runs is flaky and
dropped. Without a test the CI verdicts are taken as they are.

Failures that build and then fail the tests teach more than code that does not parse, so
rejected texts are ranked assertion failure > runtime error > syntax error (``compile()`` spots
syntax errors without running anything) and the cap per context keeps the best-ranked pairs.
Everything is deterministic for a given ``seed``: ties are broken by a seeded hash, not by
input order or Python's per-process ``hash``.

Governance, before any record becomes a candidate (each drop is counted in the funnel's
``records_dropped`` under its own reason): records of repositories excluded from training
(``kaizen repos exclude``), texts cut off by ``max_tokens`` and run unchanged (never trained as
complete), and records whose prompt, suffix or texts hold a secret (:mod:`trainer.secrets`;
resampled texts are scanned too). A ``fix`` pair needs its fix within ``max_fix_distance``
(normalised edit distance) of the text the model served, else it is dropped (``fix_too_far``):
a CI token can claim any text "fixed" a completion. No reporting token may be behind more
than ``max_token_share`` of the round's pairs (``token_cap``); ``token_shares`` in the funnel
shows each token's share (before the cap too, so ops see a token with outsized influence).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from server.engine.fim import FimFormat
from server.store.repositories import normalise_repository
from trainer.records import OutcomeRecord
from trainer.sandbox import RunResult, Sandbox
from trainer.secrets import SecretScanner

__all__ = [
    "Context",
    "Pair",
    "PairBuildResult",
    "PairInfo",
    "ResampleAsk",
    "Alternative",
    "build_judge_pairs",
    "build_pairs",
    "edit_distance_ratio",
    "failure_kind",
    "normalize_text",
    "record_id",
]

# Normalised edit distance (Levenshtein / longer length) a fix may be from the served text.
# Measured on MBPP+'s canonical bodies (the simulation's fixes; `benchmarks/poison.py
# --fix-distances`): one-edit bug fixes p50 0.022, p90 0.251 (98.6% within 0.8); the last line
# rewritten p50 0.60, p90 0.77 (95% within); another task's body put in place p50 0.74 (64.5%
# within). Generous for real fixes, so it stops only the most distant replacements; the
# per-token cap is what bounds a poisoner who stays close.
DEFAULT_MAX_FIX_DISTANCE = 0.8
DEFAULT_MAX_TOKEN_SHARE = 0.5

Source = Literal["fix", "ci", "ci_resample", "resample", "judge"]
FailureKind = Literal["assertion", "runtime", "syntax"]
Verdict = Literal["pass", "fail", "flaky"]

# Lower sorts first when a context has more pairs than the cap allows.
# CI-side alternatives come after the developers' own texts (their verdicts are as real, but
# the texts are the model's, not what anyone kept) and before the trainer's own resamples.
_SOURCE_PRIORITY: dict[str, int] = {"fix": 0, "ci": 1, "ci_resample": 2, "resample": 3}
# Higher is a more instructive rejected text.
_KIND_RANK: dict[str, int] = {"assertion": 3, "runtime": 2, "syntax": 1}
_DROP_REASONS = (
    "identical",
    "flaky",
    "chosen_failed",
    "rejected_passed",
    "fix_too_far",
    "secret",
    "cap",
    "token_cap",
)
_RECORD_DROP_REASONS = ("excluded_repository", "cut_off", "secret")
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
    # The text before and after the cursor, so that a prompt too long for the context can be
    # trimmed and rebuilt (:mod:`trainer.budget`); both None for a chat prompt (not trimmable).
    prefix: str | None = None
    suffix: str | None = None
    # The repository context the prompt starts with (before ``<|fim_prefix|>``), which
    # trimming drops first; "" for a file-level prompt.
    context: str = ""
    # The pair's weight in the loss: 1 for execution-verified pairs, less for judge pairs.
    weight: float = 1.0


@dataclass(frozen=True)
class ResampleAsk:
    """One context to resample, with the request parameters the model was served under."""

    prompt: str
    suffix: str | None
    single_line: bool = False
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    fim_context: str = ""  # the repository context the model saw before the prefix


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
    def ask(self) -> ResampleAsk:
        """How to sample this context again: as its first record was served."""
        first = self.records[0]
        return ResampleAsk(
            prompt=self.prompt,
            suffix=self.suffix,
            single_line=first.single_line,
            stop=first.stop,
            max_tokens=first.max_tokens,
            fim_context=self.fim_context,
        )

    @property
    def fim_context(self) -> str:
        """The repository context its first record was served with ("" for none)."""
        return self.records[0].fim_context if self.suffix is not None else ""

    @property
    def model_prompt(self) -> str:
        """The prompt exactly as the model saw it: FIM-formatted (after any repository
        context) when there was a suffix."""
        if self.suffix is not None:
            return FimFormat().build(self.prompt, self.suffix, self.fim_context)
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
    # The API tokens whose CI reports made its two sides (sorted; empty: none recorded).
    token_ids: tuple[int, ...] = ()


@dataclass
class PairBuildResult:
    pairs: list[Pair]
    info: dict[str, PairInfo]  # by pair id
    funnel: dict[str, Any]
    # Records left out before pairing, "completion_id:choice_index:run_id" -> why (no text:
    # a round stores this, and a secret must not travel with it).
    dropped_records: dict[str, str] = field(default_factory=dict)

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


def _with_test(code: str, test: str) -> tuple[str, str]:
    # What trainer.sandbox.check_program judges; the sandbox puts the test after the code
    # itself (and seals its end), so run_tests can batch them.
    return code, test


def edit_distance_ratio(a: str, b: str, *, limit: float = 1.0) -> float:
    """Levenshtein distance of ``a`` and ``b`` over the longer one's length (0: equal, 1: all
    changed). Work stays inside a band of ``limit`` around the diagonal and stops once the
    ratio must exceed ``limit`` (a value above it is returned then), so checking a bound on
    long texts costs O(len * band), not O(len ** 2)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    k = int(limit * longest)  # the largest distance within the limit
    if abs(len(a) - len(b)) > k:
        return abs(len(a) - len(b)) / longest
    over = k + 1
    previous = [j if j <= k else over for j in range(len(b) + 1)]
    for i in range(1, len(a) + 1):
        current = [over] * (len(b) + 1)
        current[0] = i if i <= k else over
        char = a[i - 1]
        for j in range(max(1, i - k), min(len(b), i + k) + 1):
            value = min(previous[j - 1] + (char != b[j - 1]), previous[j] + 1, current[j - 1] + 1)
            current[j] = value if value <= k else over
        if min(current) >= over:
            return over / longest
        previous = current
    return previous[len(b)] / longest


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
    # Every CI verdict on it was on an alternative CI-side exploration asked for (none on a
    # text a developer was served): None until a record is seen.
    explored: bool | None = None
    tokens: set[int] = field(default_factory=set)  # the API tokens that reported its verdicts
    verdict: Verdict | None = None  # from the sandbox, where the context has a test
    kind: FailureKind | None = None  # from the sandbox, for failures

    def rank_kind(self) -> FailureKind:
        return self.kind or self.ci_kind


class _Executor:
    """Judges (code, test) programs in the sandbox once each (cached), re-running failures for
    flakiness. A program the sandbox flags (a faked pass) is a failure like any other, never
    re-run: flagging does not depend on luck."""

    def __init__(self, sandbox: Sandbox, flaky_reruns: int) -> None:
        self.sandbox = sandbox
        self.flaky_reruns = flaky_reruns
        self.results: dict[tuple[str, str], tuple[Verdict, FailureKind | None]] = {}
        self.runs = 0

    def run(self, programs: Iterable[tuple[str, str]]) -> None:
        todo = sorted({p for p in programs if p not in self.results})
        # A program that does not parse fails the same way every time: no sandbox needed.
        runnable = []
        for program in todo:
            if _compiles(program[0]) and _compiles(program[1]):
                runnable.append(program)
            else:
                self.results[program] = ("fail", "syntax")
        first = self._run_many(runnable)
        failed = [
            p
            for p, r in zip(runnable, first, strict=True)
            if not r.passed and r.status != "flagged"
        ]
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

    def _run_many(self, programs: Sequence[tuple[str, str]]) -> list[RunResult]:
        self.runs += len(programs)
        return self.sandbox.run_tests(programs) if programs else []


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


Fixes = dict[tuple[str, str], str]  # (failed key, fixed key) -> the text the model served


def _candidates(context: Context) -> tuple[dict[str, _Candidate], Fixes, int]:
    """Distinct texts of a context keyed by normalised text, the (failed, fixed) key pairs
    with the served text each fix must stay close to, and how many recorded texts were
    duplicates of one seen before."""
    candidates: dict[str, _Candidate] = {}
    fixes: Fixes = {}
    duplicates = 0

    def add(text: str) -> _Candidate:
        nonlocal duplicates
        key = normalize_text(text)
        if key in candidates:
            duplicates += 1
        else:
            candidates[key] = _Candidate(text=text)
        return candidates[key]

    def reported(candidate: _Candidate, record: OutcomeRecord) -> _Candidate:
        if record.token_id is not None:
            candidate.tokens.add(record.token_id)
        alternative = record.source == "resample"
        candidate.explored = (
            alternative if candidate.explored is None else (candidate.explored and alternative)
        )
        return candidate

    for record in context.records:
        if record.passed:
            reported(add(record.final_text), record).ci_pass = True
        elif record.failed:
            candidate = reported(add(record.final_text), record)
            candidate.ci_fail = True
            if record.status == "build_failed":
                candidate.ci_kind = "syntax"  # collection failed: the code did not build
            if record.fixed_text is not None:
                # The fix passed in CI too (its own record says so, unless that one is outside
                # the loaded window).
                reported(add(record.fixed_text), record).ci_pass = True
                served = (
                    record.completion_text
                    if record.completion_text is not None
                    else record.final_text
                )
                fixes[(normalize_text(record.final_text), normalize_text(record.fixed_text))] = (
                    served
                )
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


def _propose(candidates: dict[str, _Candidate], fixes: Fixes) -> list[_Proposal]:
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
                else "ci_resample"
                if candidates[c].explored or candidates[r].explored
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


def _repository_id(repository: str | None) -> str | None:
    if repository is None:
        return None
    try:
        return normalise_repository(repository)
    except ValueError:
        return repository


def record_id(record: OutcomeRecord) -> str:
    """A record's id in a round's files and an adapter's manifest."""
    return f"{record.completion_id}:{record.choice_index}:{record.run_id}"


def _drop_records(
    records: Sequence[OutcomeRecord],
    excluded: Collection[str],
    scanner: SecretScanner | None,
) -> tuple[list[OutcomeRecord], dict[str, str]]:
    """The records that may become training data, and the others with why they went."""
    dropped: dict[str, str] = {}
    kept = []
    for record in records:
        if _repository_id(record.repository) in excluded:
            dropped[record_id(record)] = "excluded_repository"
        elif record.cut_off:
            dropped[record_id(record)] = "cut_off"
        else:
            kept.append(record)
    if scanner is None:
        return kept, dropped

    def texts(r: OutcomeRecord) -> list[str]:
        parts = (r.prompt, r.suffix, r.completion_text, r.final_text, r.fixed_text)
        return [t for t in parts if t]

    # Contexts share prompts: scan each distinct text once.
    distinct = sorted({t for r in kept for t in texts(r)})
    flagged = {t for t, found in zip(distinct, scanner.find_many(distinct), strict=True) if found}
    clean = []
    for record in kept:
        if any(t in flagged for t in texts(record)):
            dropped[record_id(record)] = "secret"
        else:
            clean.append(record)
    return clean, dropped


def _token_cap(
    pairs: list[Pair],
    info: dict[str, PairInfo],
    share: float,
    lone_token: bool,
    seed: int,
) -> tuple[list[Pair], int]:
    """Drop pairs until no token is behind more than ``share`` of the pairs that remain. A
    pair counts against every token that reported one of its sides; the pairs dropped first
    are those the over-represented token alone is behind (its own failure -> "fix" claims),
    then by a seeded hash. A round with one reporting token is not capped (a single-team
    install has one CI token); a token behind every pair loses them all (the round then has
    too few pairs and is skipped, which is the safe outcome when one token decides it)."""
    if share >= 1 or lone_token or not pairs:
        return pairs, 0
    kept = {p.id: p for p in pairs}
    while kept:
        counts = Counter(t for pid in kept for t in info[pid].token_ids)
        over = [t for t, n in counts.items() if n > share * len(kept)]
        if not over:
            break
        worst = max(over, key=lambda t: (counts[t], -t))
        victim = min(
            (pid for pid in kept if worst in info[pid].token_ids),
            key=lambda pid: (len(info[pid].token_ids), _seeded(seed, "token_cap", pid)),
        )
        del kept[victim]
    return [p for p in pairs if p.id in kept], len(pairs) - len(kept)


def _token_shares(info: dict[str, PairInfo], pair_ids: Iterable[str]) -> dict[str, float]:
    ids = list(pair_ids)
    counts = Counter(t for pid in ids for t in info[pid].token_ids)
    return {str(t): round(n / len(ids), 4) for t, n in sorted(counts.items())}


def build_pairs(
    records: Sequence[OutcomeRecord],
    *,
    sandbox: Sandbox,
    tests_for: Callable[[Context], str | None] | None = None,
    resample: Callable[[str, str | None, int], list[str]] | None = None,
    resample_batch: Callable[[Sequence[ResampleAsk], int], list[list[str]]] | None = None,
    n_resample: int = 8,
    flaky_reruns: int = 1,
    max_pairs_per_context: int = 4,
    seed: int = 0,
    excluded_repositories: Collection[str] = (),
    secret_scanner: SecretScanner | None = None,
    scan_secrets: bool = True,
    max_fix_distance: float = DEFAULT_MAX_FIX_DISTANCE,
    max_token_share: float = DEFAULT_MAX_TOKEN_SHARE,
) -> PairBuildResult:
    """Preference pairs from outcome records (see the module docstring for the rules).

    ``tests_for(context)`` returns test code (asserts run after the program) for contexts that
    have one, else None. ``resample(prompt, suffix, n)`` returns ``n`` completions of the
    current policy for a context (prompt: the text before the cursor; suffix: after it, None
    for plain prompts). ``resample_batch(asks, n)``, where given, does the same for many
    contexts at once (each :class:`ResampleAsk` carries the served request's ``single_line``,
    ``stop`` and ``max_tokens``), which an inference engine serves far faster than one at a
    time; it should leave out samples cut off by ``max_tokens``. Sandbox runs are batched
    across contexts (``Sandbox.run_many``).

    ``excluded_repositories``: repositories whose records are never used. ``scan_secrets``
    (default on; ``secret_scanner`` replaces the default scanner) drops every record and
    resampled text holding a secret. ``max_fix_distance``: the largest normalised edit
    distance of a fix from the served text. ``max_token_share``: the largest share of the
    pairs one reporting token may be behind (1: no cap).
    """
    if max_pairs_per_context < 1:
        raise ValueError(f"max_pairs_per_context must be at least 1: {max_pairs_per_context}")
    if flaky_reruns < 0 or n_resample < 0:
        raise ValueError("flaky_reruns and n_resample must not be negative")
    if not 0 <= max_fix_distance <= 1:
        raise ValueError(f"max_fix_distance is a ratio in [0, 1]: {max_fix_distance}")
    if not 0 < max_token_share <= 1:
        raise ValueError(f"max_token_share must be in (0, 1] (1: no cap): {max_token_share}")
    scanner = (secret_scanner or SecretScanner()) if scan_secrets else None
    verdicts = [r for r in records if r.passed or r.failed]
    excluded = frozenset(_repository_id(r) for r in excluded_repositories)
    allowed, dropped_records = _drop_records(verdicts, excluded, scanner)
    records_dropped: Counter[str] = Counter({reason: 0 for reason in _RECORD_DROP_REASONS})
    records_dropped.update(dropped_records.values())
    # Sorted so that representatives, tie-breaks and output never depend on the input order.
    usable = sorted(
        allowed,
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
        asks = [context.ask for context, _, _ in to_resample]
        samples = resample_batch(asks, n_resample) if asks else []
    else:
        assert resample is not None or not to_resample
        samples = [resample(c.prompt, c.suffix, n_resample) for c, _, _ in to_resample]  # type: ignore[misc]
    # The policy may write out a secret it memorised: scan what it sampled, too.
    sampled = sorted({t for texts in samples for t in texts[:n_resample]})
    secret_samples = (
        {t for t, f in zip(sampled, scanner.find_many(sampled), strict=True) if f}
        if scanner is not None and sampled
        else set()
    )
    for (_context, candidates, _test), texts in zip(to_resample, samples, strict=True):
        for text in texts[:n_resample]:
            key = normalize_text(text)
            if not key or key in candidates:
                continue
            if text in secret_samples:
                dropped["secret"] += 1
                continue
            candidates[key] = _Candidate(text=text, resampled=True)
            resampled += 1
    verify(to_resample)

    pairs: list[Pair] = []
    info: dict[str, PairInfo] = {}
    fix_distances: list[float] = []
    for context, candidates, fixes, test in states:
        kept = []
        for p in _propose(candidates, fixes):
            reason = _drop_reason(p, candidates, verified=test is not None)
            if reason is None and p.source == "fix":
                served = fixes[(p.rejected, p.chosen)]
                distance = edit_distance_ratio(
                    served, candidates[p.chosen].text, limit=max_fix_distance
                )
                fix_distances.append(min(distance, 1.0))
                if distance > max_fix_distance:
                    reason = "fix_too_far"
            if reason is None:
                kept.append(p)
            else:
                dropped[reason] += 1
        kept, over = _cap(kept, candidates, max_pairs_per_context, seed)
        dropped["cap"] += over
        prompt = context.model_prompt
        trimmable = context.endpoint != "chat"
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
                    prefix=context.prompt if trimmable else None,
                    suffix=context.suffix if trimmable else None,
                    context=context.fim_context if trimmable else "",
                )
            )
            info[pair_id] = PairInfo(
                context_key=context.key,
                repository=context.repository,
                source=p.source,
                rejected_kind=rejected.rank_kind(),
                token_ids=tuple(sorted(chosen.tokens | rejected.tokens)),
            )

    reporting_tokens = {r.token_id for r in usable if r.token_id is not None}
    shares_before = _token_shares(info, (p.id for p in pairs))
    pairs, over = _token_cap(pairs, info, max_token_share, len(reporting_tokens) <= 1, seed)
    dropped["token_cap"] += over
    info = {p.id: info[p.id] for p in pairs}
    by_source: Counter[str] = Counter({source: 0 for source in _SOURCE_PRIORITY})
    by_source.update(p.source for p in pairs)

    funnel: dict[str, Any] = {
        "records": len(records),
        "records_with_verdict": len(verdicts),
        "records_dropped": dict(records_dropped),
        "records_used": len(usable),
        "duplicate_texts": duplicate_texts,
        "contexts": len(contexts),
        "contexts_with_tests": sum(1 for *_, test in states if test is not None),
        "contexts_resampled": len(to_resample),
        "contexts_with_pairs": len({i.context_key for i in info.values()}),
        "resampled_candidates": resampled,
        # Records of alternatives CI-side exploration judged (completions of source resample).
        "records_ci_resample": sum(1 for r in usable if r.source == "resample"),
        "sandbox_runs": executor.runs,
        "pairs_by_source": dict(by_source),
        "dropped": dict(dropped),
        "fix_distance": _distribution(fix_distances, max_fix_distance),
        # Share of the pairs each reporting token is behind (API token ids), before and after
        # the cap: ops see a token with outsized influence even when the cap held it back.
        "token_shares_before_cap": shares_before,
        "token_shares": _token_shares(info, info),
        "max_token_share": max_token_share,
        "pairs": len(pairs),
    }
    return PairBuildResult(pairs=pairs, info=info, funnel=funnel, dropped_records=dropped_records)


def _distribution(values: Sequence[float], limit: float) -> dict[str, Any]:
    """Quantiles of the fixes' distances (rounded), so a round shows how far real fixes are."""
    if not values:
        return {"fixes": 0, "limit": limit}
    ordered = sorted(values)

    def q(x: float) -> float:
        return round(ordered[int(x * (len(ordered) - 1))], 3)  # the lower of two at a tie

    return {"fixes": len(ordered), "limit": limit, "p50": q(0.5), "p90": q(0.9), "max": q(1.0)}


# -- judge pairs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alternative:
    """One recorded text of a completion that no CI run has a verdict on: what the judge is
    asked about (``server.store.signals.choices_without_outcome``)."""

    completion_id: str
    choice_index: int
    context_key: str  # trainer.records.context_key(prompt, suffix)
    endpoint: str
    prompt: str
    suffix: str | None
    text: str
    language: str | None = None
    repository: str | None = None
    fim_context: str = ""
    cut_off: bool = False  # ended by max_tokens: not a complete answer

    @property
    def id(self) -> str:
        return f"{self.completion_id}:{self.choice_index}"


class JudgeCall(Protocol):
    """What judge pairs need of a verdict (``trainer.judge.JudgeVerdict``)."""

    @property
    def correct(self) -> bool | None: ...

    @property
    def score(self) -> float | None: ...


def build_judge_pairs(
    alternatives: Sequence[Alternative],
    calls: Mapping[str, JudgeCall],
    *,
    verified_contexts: Collection[str],
    weight: float,
    max_pairs: int,
    max_pairs_per_context: int = 4,
    seed: int = 0,
    executable: Mapping[str, bool] | None = None,
    excluded_repositories: Collection[str] = (),
    secret_scanner: SecretScanner | None = None,
) -> PairBuildResult:
    """Judge pairs (source ``judge``) from ``alternatives`` and the judge's ``calls`` on them
    (by :attr:`Alternative.id`): per context, each text the judge called correct against each
    it called wrong, never in a context of ``verified_contexts`` (any sealed verdict on any of
    its texts wins), a chosen text that ``executable`` says does not run is left out, and a
    text the judge called both ways (two records of it) is no side. Widest score margin first,
    ties by a seeded hash; at most ``max_pairs_per_context`` per context and ``max_pairs`` in
    all. Every pair has ``weight`` (below an execution pair's 1)."""
    if not 0 < weight < 1:
        raise ValueError(
            f"a judge pair weighs less than an execution pair: 0 < weight < 1: {weight}"
        )
    if max_pairs < 0 or max_pairs_per_context < 1:
        raise ValueError("max_pairs must be >= 0 and max_pairs_per_context >= 1")
    excluded = frozenset(_repository_id(r) for r in excluded_repositories)
    dropped: Counter[str] = Counter(
        {
            k: 0
            for k in (
                "verified_context",
                "excluded_repository",
                "cut_off",
                "secret",
                "unparsed",
                "not_executable",
                "conflicting",
                "cap",
            )
        }
    )
    kept: list[Alternative] = []
    for alt in alternatives:
        if alt.context_key in verified_contexts:
            dropped["verified_context"] += 1
        elif _repository_id(alt.repository) in excluded:
            dropped["excluded_repository"] += 1
        elif alt.cut_off:
            dropped["cut_off"] += 1
        else:
            kept.append(alt)
    if secret_scanner is not None and kept:
        texts = sorted({t for a in kept for t in (a.prompt, a.suffix, a.text) if t})
        flagged = {t for t, f in zip(texts, secret_scanner.find_many(texts), strict=True) if f}
        clean = [a for a in kept if not {a.prompt, a.suffix, a.text} & flagged]
        dropped["secret"] += len(kept) - len(clean)
        kept = clean

    by_context: dict[str, list[Alternative]] = defaultdict(list)
    for alt in kept:
        by_context[alt.context_key].append(alt)
    proposals: list[tuple[float, str, Alternative, Alternative]] = []
    for key in sorted(by_context):
        sides: dict[str, tuple[Alternative, bool | None, float]] = {}
        for alt in sorted(by_context[key], key=lambda a: a.id):
            call = calls.get(alt.id)
            correct = call.correct if call is not None else None
            if correct is None:
                dropped["unparsed"] += 1
                continue
            if correct and executable is not None and executable.get(alt.id) is False:
                dropped["not_executable"] += 1
                continue
            norm = normalize_text(alt.text)
            if not norm:
                continue
            score = call.score if call is not None and call.score is not None else 0.0
            if norm in sides and sides[norm][1] != correct:
                sides[norm] = (sides[norm][0], None, 0.0)  # called both ways: no side
                dropped["conflicting"] += 1
            elif norm not in sides:
                sides[norm] = (alt, correct, score)
        good = [(a, sc) for a, c, sc in sides.values() if c is True]
        bad = [(a, sc) for a, c, sc in sides.values() if c is False]
        context_props = sorted(
            (
                (-(gs - bs), _seeded(seed, "judge", g.text, b.text), g, b)
                for g, gs in good
                for b, bs in bad
            ),
            key=lambda t: (t[0], t[1]),
        )
        dropped["cap"] += max(0, len(context_props) - max_pairs_per_context)
        proposals += context_props[:max_pairs_per_context]
    proposals.sort(key=lambda t: (t[0], t[1]))
    dropped["cap"] += max(0, len(proposals) - max_pairs)
    pairs: list[Pair] = []
    info: dict[str, PairInfo] = {}
    for _, _, chosen, rejected in proposals[:max_pairs]:
        fim = chosen.suffix is not None and chosen.endpoint != "chat"
        prompt = (
            FimFormat().build(chosen.prompt, chosen.suffix or "", chosen.fim_context)
            if fim
            else chosen.prompt
        )
        pair_id = hashlib.sha256(f"{prompt}\0{chosen.text}\0{rejected.text}".encode()).hexdigest()[
            :24
        ]
        trimmable = chosen.endpoint != "chat"
        pairs.append(
            Pair(
                id=pair_id,
                prompt=prompt,
                chosen=chosen.text,
                rejected=rejected.text,
                source="judge",
                prefix=chosen.prompt if trimmable else None,
                suffix=chosen.suffix if trimmable else None,
                context=chosen.fim_context if fim else "",
                weight=weight,
            )
        )
        info[pair_id] = PairInfo(
            context_key=chosen.context_key,
            repository=chosen.repository,
            source="judge",
            rejected_kind="runtime",  # nothing ran: the judge's "no" is all that is known
        )
    funnel = {
        "alternatives": len(alternatives),
        "contexts": len(by_context),
        "judged": sum(1 for a in kept if a.id in calls),
        "dropped": dict(dropped),
        "weight": weight,
        "max_pairs": max_pairs,
        "pairs": len(pairs),
    }
    return PairBuildResult(pairs=pairs, info=info, funnel=funnel)
