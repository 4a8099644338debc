"""FastAPI dependencies: accessors for what hangs on ``app.state`` and the role checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.errors import ApiError
from server.services.auth import TokenAuthenticator
from server.services.completions import CompletionService
from server.services.feedback import FeedbackService
from server.services.rollout import RolloutService
from server.store.tokens import Principal, Role


# Dependencies are async so FastAPI does not hop to a worker thread for each one.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> CompletionService:
    return request.app.state.completion_service


async def get_feedback(request: Request) -> FeedbackService:
    return request.app.state.feedback_service


async def get_rollout(request: Request) -> RolloutService:
    return request.app.state.rollout


def _authenticator(request: Request) -> TokenAuthenticator:
    return request.app.state.authenticator


async def get_principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "Missing bearer token: send 'Authorization: Bearer <token>' "
            "(create one with `kaizen tokens create`).",
            code="missing_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = await _authenticator(request).authenticate(secret.strip())
    if principal is None:
        raise ApiError(
            401,
            "Invalid or revoked token.",
            code="invalid_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def require_roles(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits only principals with one of ``roles``."""

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise ApiError(
                403,
                f"This endpoint needs a token with role {allowed}; "
                f"this token has role {principal.role.value}.",
                code="wrong_role",
            )
        return principal

    return check


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[CompletionService, Depends(get_service)]
FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
RolloutDep = Annotated[RolloutService, Depends(get_rollout)]
AnyRole = Annotated[Principal, Depends(require_roles(Role.IDE, Role.CI, Role.OPS))]
IdeRole = Annotated[Principal, Depends(require_roles(Role.IDE, Role.OPS))]
CiRole = Annotated[Principal, Depends(require_roles(Role.CI, Role.OPS))]
OpsRole = Annotated[Principal, Depends(require_roles(Role.OPS))]
