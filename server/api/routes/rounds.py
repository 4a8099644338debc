"""``GET /v1/rounds`` (role ``ops``): the training rounds, newest first, with each one's
funnel, the gate result of its candidate and what the gate did to the registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.api.deps import DashboardDep, OpsRole
from server.protocol.dashboard import RoundList

router = APIRouter(prefix="/v1", tags=["rounds"])


@router.get("/rounds", response_model=RoundList)
async def list_rounds(
    service: DashboardDep,
    _: OpsRole,
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many rounds.")] = 50,
) -> RoundList:
    return await service.rounds(limit=limit)
