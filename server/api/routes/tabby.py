"""Tabby's API for tabby-agent (Tabby's VS Code, IntelliJ, Vim/Neovim and Eclipse plugins).

The agent appends Tabby's paths (``/v1/health``, ``/v1/completions``, ``/v1/events``) to the
endpoint in its settings, and those paths already mean OpenAI's API here, so Tabby's API lives
under ``/v1/tabby``: users type ``http://HOST:8000/v1/tabby`` as the endpoint. Being under
``/v1`` it gets the same request guard as the rest of the API (token first, limits, body size).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from server.api.cancel import cancel_on_disconnect
from server.api.deps import IdeRole
from server.api.openapi import errors
from server.protocol.tabby import (
    TabbyCompletionRequest,
    TabbyCompletionResponse,
    TabbyEvent,
    TabbyHealth,
    TabbyServerSetting,
)
from server.services.clients import ClientFeedback, TabbyService

router = APIRouter(prefix="/v1/tabby", tags=["tabby"])


def client_feedback(request: Request) -> ClientFeedback:
    state = request.app.state
    return ClientFeedback(
        feedback=state.feedback_service,
        recorder=state.recorder,
        session_factory=state.session_factory,
    )


def _service(request: Request) -> TabbyService:
    state = request.app.state
    return TabbyService(
        completions=state.completion_service,
        feedback=client_feedback(request),
        settings=state.settings,
    )


@router.get("/v1/health", response_model=TabbyHealth)
async def health(request: Request, principal: IdeRole) -> TabbyHealth:
    return _service(request).health()


# The agent retries its health check as POST when GET answers 405; both are served.
@router.post("/v1/health", response_model=TabbyHealth)
async def health_post(request: Request, principal: IdeRole) -> TabbyHealth:
    return _service(request).health()


@router.get("/v1beta/server_setting", response_model=TabbyServerSetting)
async def server_setting(principal: IdeRole) -> TabbyServerSetting:
    return TabbyServerSetting()


@router.post("/v1/completions", response_model=TabbyCompletionResponse)
async def completions(
    body: TabbyCompletionRequest, request: Request, principal: IdeRole
) -> TabbyCompletionResponse:
    service = _service(request)
    job = await service.prepare(body, principal)
    return await cancel_on_disconnect(request, service.complete(job))


@router.post(
    "/v1/events",
    response_class=Response,
    responses={
        200: {"description": "Stored (an empty body, as Tabby answers)."},
        **errors(
            {
                403: "The completion was served to another owner.",
                404: "No completion with this id was served.",
            }
        ),
    },
)
async def events(
    body: TabbyEvent,
    request: Request,
    principal: IdeRole,
    select_kind: Annotated[Literal["line"] | None, Query()] = None,
) -> Response:
    await _service(request).event(body, select_kind, principal)
    return Response(status_code=200)
