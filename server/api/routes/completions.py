"""``POST /v1/completions`` (plain and fill-in-the-middle) and ``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.api.cancel import cancel_on_disconnect
from server.api.deps import IdeRole, ServiceDep
from server.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

router = APIRouter(prefix="/v1", tags=["completions"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Which adapter version served the request ("base": none), for ops and benchmarks.
ADAPTER_HEADER = "X-Kaizen-Adapter"


def _served_by(adapter: str | None) -> dict[str, str]:
    return {ADAPTER_HEADER: adapter or "base"}


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: IdeRole,
) -> CompletionResponse | StreamingResponse:
    job = service.prepare_completion(body, principal)
    if body.stream:
        return StreamingResponse(
            service.stream_completion(job),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **_served_by(job.record.adapter)},
        )
    response.headers.update(_served_by(job.record.adapter))
    return await cancel_on_disconnect(request, service.complete(job))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: IdeRole,
) -> ChatCompletionResponse | StreamingResponse:
    job = service.prepare_chat(body, principal)
    if body.stream:
        return StreamingResponse(
            service.stream_chat(job),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **_served_by(job.record.adapter)},
        )
    response.headers.update(_served_by(job.record.adapter))
    return await cancel_on_disconnect(request, service.chat(job))
