"""Health probes, the only endpoints open without a token: ``/healthz`` (the process is alive)
and ``/readyz`` (the engine can serve)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep) -> JSONResponse:
    if service.is_ready():
        return JSONResponse({"status": "ready", "model": service.engine.model_name})
    return JSONResponse({"status": "loading"}, status_code=503)
