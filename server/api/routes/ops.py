"""Ops views: ``GET /v1/completions/{id}`` (a completion's whole history) and ``GET /v1/stats``."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import AwareDatetime

from server.api.deps import FeedbackDep, OpsRole
from server.api.openapi import errors
from server.protocol.feedback import CompletionDetailOut, StatsResponse

router = APIRouter(prefix="/v1", tags=["ops"])


@router.get(
    "/completions/{completion_id}",
    response_model=CompletionDetailOut,
    responses=errors({404: "No completion has this id."}),
)
async def get_completion(
    completion_id: str, service: FeedbackDep, _: OpsRole
) -> CompletionDetailOut:
    return await service.completion(completion_id)


@router.get("/stats", response_model=StatsResponse)
async def get_stats(
    service: FeedbackDep,
    _: OpsRole,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
) -> StatsResponse:
    return await service.stats(since, until)
