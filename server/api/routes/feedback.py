"""Feedback in: ``POST /v1/events`` (ide), ``PUT/GET /v1/ledger`` (ide / ci), ``POST
/v1/outcomes`` (ci). The contract is ``plugins/PROTOCOL.md``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from server.api.deps import CiRole, FeedbackDep, IdeRole
from server.protocol.feedback import (
    EventBatch,
    EventsResponse,
    LedgerBatch,
    LedgerList,
    LedgerPutResponse,
    OutcomeReport,
    OutcomeResponse,
)

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post("/events", response_model=EventsResponse)
async def post_events(
    batch: EventBatch, service: FeedbackDep, principal: IdeRole
) -> EventsResponse:
    return await service.record_events(batch, principal)


@router.put("/ledger", response_model=LedgerPutResponse)
async def put_ledger(
    batch: LedgerBatch, service: FeedbackDep, principal: IdeRole
) -> LedgerPutResponse:
    return await service.put_ledger(batch, principal)


@router.get("/ledger", response_model=LedgerList)
async def get_ledger(
    service: FeedbackDep,
    principal: CiRole,
    repository: Annotated[str, Query(min_length=1, max_length=512)],
    since: AwareDatetime | None = None,
) -> LedgerList:
    return await service.get_ledger(repository, since, principal)


@router.post("/outcomes", response_model=OutcomeResponse)
async def post_outcome(
    report: OutcomeReport, service: FeedbackDep, principal: CiRole
) -> OutcomeResponse:
    return await service.record_outcome(report, principal)
