"""Feedback: IDE events, the ledger and CI outcomes in; a completion's history and stats out.

The database work is synchronous SQLAlchemy, so each call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from server.errors import ApiError
from server.protocol.feedback import (
    AdapterStatsOut,
    CompletionDetailOut,
    EventBatch,
    EventOut,
    EventsResponse,
    LedgerBatch,
    LedgerEntryOut,
    LedgerList,
    LedgerPutResponse,
    OutcomeOut,
    OutcomeReport,
    OutcomeResponse,
    Refusal,
    StatsResponse,
)
from server.services.metrics import Metrics
from server.services.recorder import Recorder
from server.store import feedback as store
from server.store.repositories import normalise_repository
from server.store.tokens import Principal

LEDGER_DEFAULT_WINDOW = timedelta(days=30)


def _all_unknown(ids: list[str], what: str) -> ApiError:
    return ApiError(
        404,
        f"No {what} names a completion this server knows: {_listed(ids)}. "
        "Completion ids are the `id` of /v1/completions responses.",
        param="completion_id",
        code="unknown_completion",
    )


def _listed(ids: list[str]) -> str:
    return ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


# What each refusal means to the person reading the error (plugins/PROTOCOL.md, "Refusals").
_WHY = {
    store.NOT_OWNER: "served to another owner (an ide token writes only for completions that it, "
    "or another token with its name, received)",
    store.NOT_IN_SCOPE: "served in a repository this token does not cover",
    store.REPOSITORY_MISMATCH: "the entry names another repository than the one the completion "
    "was served in",
}


def _all_refused(refused: list[store.Refusal], unknown: list[str], what: str) -> ApiError:
    """Nothing of the batch was stored because every known completion it names is refused."""
    by_reason: dict[str, list[str]] = {}
    for r in refused:
        by_reason.setdefault(r.reason, []).append(r.completion_id)
    why = "; ".join(
        f"{_listed(sorted(set(ids)))}: {_WHY.get(reason, reason)}"
        for reason, ids in sorted(by_reason.items())
    )
    also = f" Unknown completions: {_listed(unknown)}." if unknown else ""
    return ApiError(
        403,
        f"No {what} was stored. Refused {why}.{also}",
        param="completion_id",
        code="refused_completion",
    )


def _out(refused: list[store.Refusal]) -> list[Refusal]:
    return [Refusal.model_validate(r) for r in refused]


def _scope_error(principal: Principal, repository: str, doing: str) -> ApiError:
    scope = ", ".join(sorted(principal.repositories or ()))
    return ApiError(
        403,
        f"This token may {doing} {scope} only, not {repository}. Use a ci token scoped to it "
        f"(`kaizen tokens create --role ci --name NAME --repo {repository}`), or one created "
        "with --all-repos on a single-team install.",
        param="repository",
        code="repository_not_in_scope",
    )


def _normalised(repository: str) -> str:
    try:
        return normalise_repository(repository)
    except ValueError:
        raise ApiError(
            400,
            f"`repository` {repository!r} names no repository: send the normalised origin URL, "
            "e.g. github.com/acme/app.",
            param="repository",
        ) from None


class FeedbackService:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        recorder: Recorder | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._recorder = recorder
        self._metrics = metrics

    async def _settle(self) -> None:
        """Write this replica's queued completion records first, so feedback that arrives
        right after a completion (an IDE's `shown`) finds the completion it names. Bounded:
        while the database is down this raises DatabaseUnavailableError (503, Retry-After)
        instead of hanging."""
        if self._recorder is not None:
            await self._recorder.settle()  # returns at once when nothing is queued

    async def record_events(self, batch: EventBatch, principal: Principal) -> EventsResponse:
        def work() -> store.EventsResult:
            with self._session_factory() as session:
                return store.save_events(
                    session=session,
                    token_id=principal.token_id,
                    principal=principal,
                    events=[e.model_dump() for e in batch.events],
                )

        await self._settle()
        result = await asyncio.to_thread(work)
        if self._metrics is not None:
            self._metrics.count_events(result.stored_by)
        if not result.stored and not result.duplicates:
            if result.refused:
                raise _all_refused(result.refused, result.unknown_completion_ids, "event")
            if result.unknown_completion_ids:
                raise _all_unknown(result.unknown_completion_ids, "event")
        return EventsResponse(
            stored=result.stored,
            duplicates=result.duplicates,
            unknown_completion_ids=result.unknown_completion_ids,
            refused=_out(result.refused),
        )

    async def put_ledger(self, batch: LedgerBatch, principal: Principal) -> LedgerPutResponse:
        # Stored normalised, so that CI's lookup by its normalised origin finds every entry.
        entries = [
            {**e.model_dump(), "repository": _normalised(e.repository)} for e in batch.entries
        ]

        def work() -> store.LedgerResult:
            with self._session_factory() as session:
                return store.upsert_ledger(
                    session=session,
                    entries=entries,
                    principal=principal,
                    received_at=datetime.now(UTC),
                )

        await self._settle()
        result = await asyncio.to_thread(work)
        if not result.stored and not result.duplicates:
            # A stale update is answered 200: the server has newer news, nothing to fix.
            refused = [r for r in result.refused if r.reason != store.STALE]
            if refused and len(refused) == len(result.refused):
                raise _all_refused(refused, result.unknown_completion_ids, "ledger entry")
            if result.unknown_completion_ids and not result.refused:
                raise _all_unknown(result.unknown_completion_ids, "ledger entry")
        return LedgerPutResponse(
            stored=result.stored,
            duplicates=result.duplicates,
            unknown_completion_ids=result.unknown_completion_ids,
            refused=_out(result.refused),
        )

    async def get_ledger(
        self, repository: str, since: datetime | None, principal: Principal
    ) -> LedgerList:
        since = since or datetime.now(UTC) - LEDGER_DEFAULT_WINDOW
        repository = _normalised(repository)
        if not principal.covers(repository):
            raise _scope_error(principal, repository, "read the ledgers of")

        def work() -> list[LedgerEntryOut]:
            with self._session_factory() as session:
                rows = store.active_ledger(
                    session=session, repository=repository, since=since, principal=principal
                )
                return [LedgerEntryOut.model_validate(row) for row in rows]

        data = await asyncio.to_thread(work)
        return LedgerList(data=data, count=len(data))

    async def record_outcome(self, report: OutcomeReport, principal: Principal) -> OutcomeResponse:
        # The run itself is refused outright when it is for a repository the token does not
        # cover; its completions are then judged one by one by their served records.
        if not principal.covers(report.repository):
            raise _scope_error(principal, _normalised(report.repository), "report on")
        raw = report.model_dump(mode="json")
        run = report.model_dump(exclude={"completions", "executability"})
        run["tests"] = raw["tests"]

        def work() -> store.OutcomeResult:
            with self._session_factory() as session:
                return store.save_outcome(
                    session=session,
                    run=run,
                    raw=raw,
                    token_id=principal.token_id,
                    principal=principal,
                    completions=[c.model_dump() for c in report.completions],
                    executability=[e.model_dump() for e in report.executability],
                )

        await self._settle()
        result = await asyncio.to_thread(work)
        if self._metrics is not None:
            self._metrics.count_outcomes(result.stored_by)
        return OutcomeResponse(
            run_id=report.run_id,
            duplicate=result.duplicate,
            completions=result.completions,
            unknown_completion_ids=result.unknown_completion_ids,
            refused=_out(result.refused),
        )

    async def completion(self, completion_id: str) -> CompletionDetailOut:
        def work() -> CompletionDetailOut | None:
            with self._session_factory() as session:
                detail = store.completion_detail(session=session, completion_id=completion_id)
                if detail is None:
                    return None
                out = CompletionDetailOut.model_validate(detail.completion)
                out.events = [EventOut.model_validate(e) for e in detail.events]
                out.ledger = [LedgerEntryOut.model_validate(e) for e in detail.ledger]
                out.outcomes = [
                    OutcomeOut(
                        run_id=run.run_id,
                        repository=run.repository,
                        commit=run.commit,
                        run_status=run.status,
                        status=o.status,
                        choice_index=o.choice_index,
                        file_path=o.file_path,
                        final_text=o.final_text,
                        tests=o.tests,
                        received_at=run.received_at,
                    )
                    for o, run in detail.outcomes
                ]
                return out

        out = await asyncio.to_thread(work)
        if out is None:
            raise ApiError(
                404,
                f"No completion with id {completion_id!r}.",
                param="completion_id",
                code="unknown_completion",
            )
        return out

    async def stats(self, since: datetime | None, until: datetime | None) -> StatsResponse:
        until = until or datetime.now(UTC)
        since = since or until - timedelta(days=7)
        if since >= until:
            raise ApiError(400, "`since` must be before `until`.", param="since")

        def work() -> list[AdapterStatsOut]:
            with self._session_factory() as session:
                return [
                    AdapterStatsOut(
                        adapter=s.adapter,
                        completions=s.completions,
                        shown=s.shown,
                        accepted=s.accepted,
                        acceptance_rate=s.acceptance_rate,
                        with_outcome=s.with_outcome,
                        passed=s.passed,
                        ci_pass_rate=s.ci_pass_rate,
                    )
                    for s in store.adapter_stats(session=session, since=since, until=until)
                ]

        return StatsResponse(since=since, until=until, data=await asyncio.to_thread(work))
