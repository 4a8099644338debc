"""The registry and rollout (role ``ops``): list adapters with their evaluation and online
results, promote, roll back, pin, set the canary share, pause rollout or training."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import OpsRole, RolloutDep
from server.api.openapi import errors
from server.errors import ApiError
from server.protocol.rollout import (
    AdapterDetailOut,
    AdapterList,
    PromoteRequest,
    RollbackRequest,
    RolloutChange,
    RolloutOut,
    RolloutUpdate,
)
from server.store.tokens import Principal

router = APIRouter(prefix="/v1", tags=["rollout"])


def _actor(principal: Principal) -> str:
    return f"ops:{principal.name}"


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(rollout: RolloutDep, _: OpsRole) -> AdapterList:
    return await rollout.list_adapters()


_UNKNOWN = {404: "No adapter version has this name."}
_CONFLICT = {409: "The registry's state does not allow this change (the message says why)."}


@router.get("/adapters/{name}", response_model=AdapterDetailOut, responses=errors(_UNKNOWN))
async def get_adapter(name: str, rollout: RolloutDep, _: OpsRole) -> AdapterDetailOut:
    return await rollout.adapter_detail(name)


@router.post(
    "/adapters/{name}/promote",
    response_model=RolloutChange,
    responses=errors(
        {**_UNKNOWN, **_CONFLICT, 422: "The engine refused to load the adapter (the reason)."}
    ),
)
async def promote_adapter(
    name: str, body: PromoteRequest, rollout: RolloutDep, principal: OpsRole
) -> RolloutChange:
    return await rollout.promote(name, body.to, actor=_actor(principal), reason=body.reason)


@router.post("/rollout/rollback", response_model=RolloutChange, responses=errors(_CONFLICT))
async def rollback(body: RollbackRequest, rollout: RolloutDep, principal: OpsRole) -> RolloutChange:
    return await rollout.rollback(actor=_actor(principal), reason=body.reason)


@router.get("/rollout", response_model=RolloutOut)
async def get_rollout(rollout: RolloutDep, _: OpsRole) -> RolloutOut:
    return await rollout.state()


@router.put(
    "/rollout",
    response_model=RolloutChange,
    responses=errors(
        {
            404: "`pinned` names no adapter version.",
            **_CONFLICT,
            422: "The engine refused to load the adapter to pin (the reason).",
        }
    ),
)
async def update_rollout(
    body: RolloutUpdate, rollout: RolloutDep, principal: OpsRole
) -> RolloutChange:
    # Only `pinned: null` means something (unpin); a null elsewhere would reach a NOT NULL
    # column as a 500.
    for field in sorted(body.model_fields_set - {"pinned"}):
        if getattr(body, field) is None:
            raise ApiError(
                400,
                f"'{field}' cannot be null; leave it out to keep its current value.",
                param=field,
            )
    return await rollout.update(body, actor=_actor(principal))
