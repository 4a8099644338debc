"""FastAPI dependencies: accessors for what hangs on ``app.state`` and the role checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.config import Settings
from server.errors import ApiError
from server.services.auth import TokenAuthenticator
from server.services.completions import CompletionService
from server.services.dashboard import DashboardService
from server.services.feedback import FeedbackService
from server.services.metrics import Metrics
from server.services.rollout_ops import RolloutOps
from server.services.sessions import DashboardSessions
from server.store.tokens import Principal, Role


# Dependencies are async so FastAPI does not hop to a worker thread for each one.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> CompletionService:
    return request.app.state.completion_service


async def get_feedback(request: Request) -> FeedbackService:
    return request.app.state.feedback_service


async def get_rollout(request: Request) -> RolloutOps:
    return request.app.state.rollout


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_dashboard(request: Request) -> DashboardService:
    return request.app.state.dashboard


def _authenticator(request: Request) -> TokenAuthenticator:
    return request.app.state.authenticator


# Declares the bearer scheme in the OpenAPI spec for every route that needs a token. It never
# refuses by itself (auto_error=False): the refusal, with our error shape, is authenticate's.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="A Kaizen token (`kaizen tokens create --role ide|ci|ops`).",
)

# Where the request guard (server/api/guard.py) leaves the principal it authenticated.
PRINCIPAL_STATE_KEY = "kaizen_principal"


async def authenticate(authorization: str | None, authenticator: TokenAuthenticator) -> Principal:
    """The principal behind an ``Authorization`` header, or a 401 :class:`ApiError`."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "Missing bearer token: send 'Authorization: Bearer <token>' "
            "(create one with `kaizen tokens create`).",
            code="missing_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = await authenticator.authenticate(secret.strip())
    if principal is None:
        raise ApiError(
            401,
            "Invalid or revoked token.",
            code="invalid_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


async def authenticate_session(cookie: str, sessions: DashboardSessions) -> Principal:
    """The principal behind a dashboard session cookie, or a 401 :class:`ApiError`."""
    principal = await sessions.verify(cookie)
    if principal is None:
        raise ApiError(
            401,
            "The dashboard session is invalid or has expired: log in again at /dashboard/login.",
            code="invalid_session",
        )
    return principal


async def get_page_principal(request: Request) -> Principal | None:
    """Who the guard authenticated for a dashboard page (bearer header or session cookie);
    None when nobody did, and the page sends the browser to its login form."""
    principal = getattr(request.state, PRINCIPAL_STATE_KEY, None)
    return principal if isinstance(principal, Principal) else None


async def get_principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    # The guard authenticates /v1/* before the body is read, so that a client without a valid
    # token learns nothing about its body; routes outside /v1 authenticate here.
    principal = getattr(request.state, PRINCIPAL_STATE_KEY, None)
    if isinstance(principal, Principal):
        return principal
    return await authenticate(request.headers.get("authorization"), _authenticator(request))


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

    check.roles = frozenset(roles)  # type: ignore[attr-defined]  # read by server/api/openapi.py
    return check


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[CompletionService, Depends(get_service)]
FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
RolloutDep = Annotated[RolloutOps, Depends(get_rollout)]
DashboardDep = Annotated[DashboardService, Depends(get_dashboard)]
PagePrincipal = Annotated[Principal | None, Depends(get_page_principal)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
# Every client's role; not a scraper's metrics token, which reads /metrics only.
ClientRole = Annotated[Principal, Depends(require_roles(Role.IDE, Role.CI, Role.OPS))]
IdeRole = Annotated[Principal, Depends(require_roles(Role.IDE, Role.OPS))]
CiRole = Annotated[Principal, Depends(require_roles(Role.CI, Role.OPS))]
OpsRole = Annotated[Principal, Depends(require_roles(Role.OPS))]
MetricsRole = Annotated[Principal, Depends(require_roles(Role.METRICS, Role.OPS))]
