"""``POST /v1/completions`` (plain and fill-in-the-middle) and ``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.api.cancel import cancel_on_disconnect
from server.api.deps import IdeRole, ServiceDep
from server.api.openapi import errors, streamed
from server.protocol.completions import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

router = APIRouter(
    prefix="/v1",
    tags=["completions"],
    responses=errors(
        {
            404: "`model` names neither the base model nor a loaded adapter.",
            503: "The model is still loading, or the database is unavailable.",
        }
    ),
)
_STREAMED = "The completion; with `stream: true`, server-sent events ending in `data: [DONE]`."

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Which adapter version served the request ("base": none), for ops and benchmarks.
ADAPTER_HEADER = "X-Kaizen-Adapter"


def _served_by(adapter: str | None) -> dict[str, str]:
    return {ADAPTER_HEADER: adapter or "base"}


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=streamed(CompletionResponse, _STREAMED),
)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: IdeRole,
) -> CompletionResponse | StreamingResponse:
    job = await service.prepare_completion(body, principal)
    if body.stream:
        return StreamingResponse(
            service.stream_completion(job),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **_served_by(job.record.adapter)},
        )
    response.headers.update(_served_by(job.record.adapter))
    return await cancel_on_disconnect(request, service.complete(job))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=streamed(ChatCompletionChunk, _STREAMED),
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: IdeRole,
) -> ChatCompletionResponse | StreamingResponse:
    job = await service.prepare_chat(body, principal)
    if body.stream:
        return StreamingResponse(
            service.stream_chat(job),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **_served_by(job.record.adapter)},
        )
    response.headers.update(_served_by(job.record.adapter))
    return await cancel_on_disconnect(request, service.chat(job))
