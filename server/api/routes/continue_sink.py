"""Continue's data destination: ``POST /v1/continue/data``.

Continue (continuedev/continue, ``core/data/log.ts``) posts one JSON event per request,
``{name, data, schema, level, profileId}``, with ``Authorization: Bearer <apiKey>`` of the
destination in its ``config.yaml``. Autocomplete events (schema 0.2.0) say whether a completion
was accepted; they become Kaizen events and ledger entries. The answer is 200 whatever happened
to the event (Continue only logs a failure, and a refusal would not make it send a better one),
with what was done in the body.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.api.deps import IdeRole
from server.api.routes.tabby import client_feedback
from server.services.clients import ContinueSink

router = APIRouter(prefix="/v1/continue", tags=["continue"])


class SinkResponse(BaseModel):
    stored: bool
    completion_id: str | None
    detail: str


@router.post("/data", response_model=SinkResponse)
async def data(request: Request, principal: IdeRole) -> SinkResponse:
    # Read by hand, not as a model: any body, even one that is not JSON, gets a 200.
    try:
        payload: Any = json.loads(await request.body())
    except ValueError:
        payload = None
    sink = ContinueSink(
        feedback=client_feedback(request),
        session_factory=request.app.state.session_factory,
        settings=request.app.state.settings,
    )
    result = await sink.receive(payload, principal)
    return SinkResponse(
        stored=result.stored, completion_id=result.completion_id, detail=result.detail
    )
