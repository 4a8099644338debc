"""Health probes, the only endpoints open without a token: ``/healthz`` (the process is alive)
and ``/readyz`` (the engine can serve, and how its dependencies are).

``/readyz`` answers 503 only while the engine cannot serve. A database outage does not make it
fail: completions go on for recently verified tokens and their records wait in the journal, so
taking every replica out of a load balancer would turn a degraded service into none. It then
answers 200 with ``"status": "degraded"`` and says which dependency is down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server.api.deps import ServiceDep
from server.store.journal import is_database_unavailable

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0
PROBE_CACHE_S = 1.0  # probes from a load balancer every few hundred ms share one query


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _ping(request: Request) -> None:
    with request.app.state.session_factory() as session:
        session.execute(text("SELECT 1"))


async def _database(request: Request) -> str:
    """ "ok" or "unavailable", from one ``SELECT 1`` at a time: while a probe is stuck on a
    database that hangs, later ones wait for it (up to the timeout) instead of piling up
    threads."""
    state = request.app.state
    cached = getattr(state, "readyz_database", None)
    now = time.monotonic()
    if cached is not None and now - cached[0] < PROBE_CACHE_S:
        return cached[1]
    probe = getattr(state, "readyz_probe", None)
    if probe is None or probe.done():
        probe = state.readyz_probe = asyncio.ensure_future(asyncio.to_thread(_ping, request))
    try:
        await asyncio.wait_for(asyncio.shield(probe), PROBE_TIMEOUT_S)
        result = "ok"
    except TimeoutError:
        result = "unavailable"
    except Exception as exc:
        result = "unavailable" if is_database_unavailable(exc) else f"error: {type(exc).__name__}"
    state.readyz_database = (time.monotonic(), result)
    return result


@router.get("/readyz")
async def readyz(request: Request, service: ServiceDep) -> JSONResponse:
    dependencies: dict[str, Any] = {
        "engine": "ready" if service.is_ready() else "loading",
        **request.app.state.recorder.status(),
        "database": await _database(request),
    }
    if not service.is_ready():
        return JSONResponse({"status": "loading", "dependencies": dependencies}, status_code=503)
    degraded = dependencies["database"] != "ok" or dependencies.get("journal") == "failing"
    return JSONResponse(
        {
            "status": "degraded" if degraded else "ready",
            "model": service.engine.model_name,
            "dependencies": dependencies,
        }
    )
