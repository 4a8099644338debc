"""Training material from the database: one record per CI verdict on a completion, read-only.

The server keeps what it served (``completions``, ``completion_choices``) apart from what CI
later said about it (``ci_runs``, ``completion_outcomes``). The trainer wants them joined: for
each outcome, the context the model saw (prompt and suffix), the text it served, the text CI
actually ran (``final_text``: the developer may have edited it) and the verdict.

A completion that failed and that the developer then edited into passing code has two outcomes
(``failed`` with the original text, ``passed`` with the fix, see ``plugins/PROTOCOL.md``). The
failed record carries the fix as ``fixed_text`` so that the pair builder can pair them directly.

A record also keeps what the model was asked exactly (``single_line``, ``stop``, ``max_tokens``
from the request, the choice's ``finish_reason``: resampling repeats them, and a text cut off
by ``max_tokens`` is never trained as complete) and who reported the verdict (``token_id``, for
the per-token cap). Its ``repository`` is the one the editor named when the completion was
served, not the one the CI run claims: a CI token must not be able to move a completion into
another repository's share of the training data.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from server.store.models import CiRun, Completion, CompletionOutcome, RecordedChoice

__all__ = ["FAILING", "PASSING", "OutcomeRecord", "context_key", "load_outcome_records"]

PASSING = frozenset({"passed"})
# "error" is not a verdict on the code (interrupted run, no tests collected, killed by a
# signal: see the pytest plugin and kaizen-report), so it is neither passing nor failing.
FAILING = frozenset({"failed", "build_failed"})


def context_key(prompt: str, suffix: str | None) -> str:
    """Identity of what the model was asked: the same prompt and suffix give the same key."""
    return hashlib.sha256(f"{prompt}\0{suffix or ''}".encode()).hexdigest()


@dataclass(frozen=True)
class OutcomeRecord:
    """One CI verdict on one choice of one completion, with everything the trainer needs."""

    completion_id: str
    choice_index: int
    context_key: str
    endpoint: str  # "completions" | "chat"; chat prompts are the rendered template
    prompt: str  # the text before the cursor (FIM) or the whole prompt
    suffix: str | None  # the text after the cursor; None for plain completions
    language: str | None
    completion_text: str | None  # the text as served; None if the choice was never recorded
    final_text: str  # the region's text when CI ran it
    status: str  # passed | failed | build_failed | error
    run_id: str
    repository: str | None
    file_path: str | None
    adapter: str | None  # None: the base model served it
    received_at: datetime  # when the CI run reached the server
    # Test code (asserts) the CI hook sent to judge this completion in the sandbox, if any.
    test_code: str | None = None
    # For a failing outcome: the text of the next passing outcome of the same choice, when the
    # developer changed the text in between (the failure -> fix case); else None.
    fixed_text: str | None = None
    # The API token that reported the CI run (None: a run stored without one).
    token_id: int | None = None
    # The request as the model got it (``completions.params``) and how the choice ended.
    single_line: bool = False
    stop: tuple[str, ...] = ()  # every stop string the server used, suffix stops included
    max_tokens: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | None (not recorded)
    # What the model saw before ``<|fim_prefix|>`` (repository-level files from Tabby's
    # snippets or Continue's multi-file template: ``params.fim_context``); "" for none.
    fim_context: str = ""
    # "serve", or "resample": an alternative CI asked for and judged with the project's own
    # tests (CI-side exploration), sampled from ``parent_id``'s context (the same prompt and
    # suffix, hence the same ``context_key``).
    source: str = "serve"
    parent_id: str | None = None

    @property
    def cut_off(self) -> bool:
        """The served text ended because ``max_tokens`` ran out, and CI ran it unchanged: it is
        not a complete answer, whatever CI said about it."""
        return self.finish_reason == "length" and self.final_text == self.completion_text

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    @property
    def failed(self) -> bool:
        return self.status in FAILING


def load_outcome_records(
    *, session: Session, since: datetime | None = None, until: datetime | None = None
) -> list[OutcomeRecord]:
    """Every (completion, choice, outcome) whose CI run arrived at or after ``since`` and at or
    before ``until``, oldest run first. Reads only.

    Runs are ordered by when they finished (as CI reported it; else their arrival), then by
    arrival: a report spooled while the server was down arrives late but still ran before the
    fix that followed it.
    """
    query = (
        select(CompletionOutcome, CiRun, Completion, RecordedChoice)
        .join(CiRun, CiRun.id == CompletionOutcome.ci_run_id)
        .join(Completion, Completion.id == CompletionOutcome.completion_id)
        .outerjoin(
            RecordedChoice,
            and_(
                RecordedChoice.completion_id == CompletionOutcome.completion_id,
                RecordedChoice.index == CompletionOutcome.choice_index,
            ),
        )
    )
    if since is not None:
        query = query.where(CiRun.received_at >= since)
    if until is not None:
        query = query.where(CiRun.received_at <= until)

    rows = sorted(
        session.execute(query).tuples(),
        key=lambda row: (row[1].finished_at or row[1].received_at, row[1].received_at, row[0].id),
    )
    records: list[OutcomeRecord] = []
    for outcome, run, completion, choice in rows:
        params = completion.params or {}
        records.append(
            OutcomeRecord(
                completion_id=completion.id,
                choice_index=outcome.choice_index,
                context_key=context_key(completion.prompt, completion.suffix),
                endpoint=completion.endpoint,
                prompt=completion.prompt,
                suffix=completion.suffix,
                language=completion.language,
                completion_text=choice.text if choice is not None else None,
                final_text=outcome.final_text,
                status=outcome.status,
                run_id=run.run_id,
                # What the editor said when the completion was served; a CI run's claim can be
                # anything its token is allowed to write, so it never moves a completion.
                repository=completion.repository,
                file_path=outcome.file_path or completion.file_path,
                adapter=completion.adapter,
                received_at=run.received_at,
                test_code=outcome.test_code,
                token_id=run.token_id,
                single_line=bool(params.get("single_line", False)),
                stop=tuple(str(s) for s in params.get("stop") or ()),
                max_tokens=_int_or_none(params.get("max_tokens")),
                finish_reason=choice.finish_reason if choice is not None else None,
                fim_context=str(params.get("fim_context") or ""),
                source=completion.source,
                parent_id=completion.parent_id,
            )
        )
    return _attach_fixes(records)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _attach_fixes(records: list[OutcomeRecord]) -> list[OutcomeRecord]:
    """Give each failing record the text of the first later passing outcome of its choice, when
    that text differs (the same text passing later is a flaky run, not a fix)."""
    by_choice: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, record in enumerate(records):  # records are in run order
        by_choice[(record.completion_id, record.choice_index)].append(i)
    out = list(records)
    for indices in by_choice.values():
        for position, i in enumerate(indices):
            if not records[i].failed:
                continue
            later_pass = next(
                (records[j] for j in indices[position + 1 :] if records[j].passed), None
            )
            if later_pass is not None and later_pass.final_text != records[i].final_text:
                out[i] = replace(records[i], fixed_text=later_pass.final_text)
    return out
