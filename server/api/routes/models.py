"""``GET /v1/models``: the base model and the adapters loaded in the engine."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import ClientRole, ServiceDep
from server.protocol.completions import ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep, _: ClientRole) -> ModelList:
    return service.list_models()
