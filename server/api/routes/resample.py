"""``POST /v1/resample`` (role ci): alternatives of a served completion for CI-side exploration.

The contract is ``plugins/PROTOCOL.md`` ("Exploration"); the work is
:class:`server.services.resample.ResampleService`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.api.deps import CiRole
from server.api.openapi import errors
from server.protocol.feedback import ResampleRequest, ResampleResponse
from server.services.resample import ResampleService


async def get_resample(request: Request) -> ResampleService:
    # Built from what app.state already holds; cheap, so no state of its own.
    state = request.app.state
    return ResampleService(state.completion_service, state.session_factory)


ResampleDep = Annotated[ResampleService, Depends(get_resample)]

router = APIRouter(
    prefix="/v1",
    tags=["feedback"],
    responses=errors(
        {
            404: "`completion_id` names no completion this server served.",
            429: "The completion already has the most alternatives the server samples for one.",
            503: "The model is still loading, or the database is unavailable.",
        }
    ),
)


@router.post("/resample", response_model=ResampleResponse)
async def resample(
    body: ResampleRequest, service: ResampleDep, principal: CiRole
) -> ResampleResponse:
    return await service.resample(body, principal)
