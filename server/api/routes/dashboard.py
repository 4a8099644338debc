"""The ops dashboard: ``/dashboard`` (server-rendered HTML; its charts draw ``GET /v1/dashboard``
with the vendored uPlot), its login form, and the JSON it draws.

A browser sends no bearer header when it navigates, so the login form takes an ops token once
and answers with an HttpOnly, SameSite=Strict session cookie (:mod:`server.services.sessions`);
the request guard accepts that cookie on ``DASHBOARD_PATHS`` only, and only for reads. Every
page and file here needs the ops role, like the JSON: without a session the browser is sent to
the login form, another role gets a 403 page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from server.api.deps import DashboardDep, OpsRole, PagePrincipal
from server.protocol.dashboard import DashboardOut
from server.services.sessions import COOKIE
from server.store.tokens import Principal, Role

# Where the guard takes the session cookie (server/api/guard.py), and nowhere else.
DASHBOARD_PATHS = ("/dashboard", "/v1/dashboard")
LOGIN = "/dashboard/login"

_HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=str(_HERE / "templates"))
_STATIC = _HERE / "static"
# The files the page loads; nothing else under static/ is served.
_FILES = {
    "uplot.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
    "uplot.css": ("vendor/uplot/uPlot.min.css", "text/css"),
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
Days = Annotated[int, Query(ge=1, le=366, description="Days of history, today included.")]

pages = APIRouter(prefix="/dashboard", include_in_schema=False)
router = APIRouter(prefix="/v1", tags=["dashboard"])


def _page(request: Request, template: str, status: int = 200, **context: object) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, context, status_code=status)
    response.headers.update(_HEADERS)
    return response


def _refused(request: Request, principal: Principal) -> HTMLResponse:
    return _page(request, "refused.html", 403, role=principal.role.value, name=principal.name)


@pages.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", error=None)


@pages.post("/login")
async def login(request: Request) -> Response:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        # Another site's form posting a token of its own into this browser (login CSRF).
        return _page(request, "login.html", 403, error="Log in from this server's own page.")
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    secret = (form.get("token") or [""])[0].strip()
    principal = await request.app.state.authenticator.authenticate(secret) if secret else None
    if principal is None:
        return _page(request, "login.html", 401, error="Invalid or revoked token.")
    if principal.role is not Role.OPS:
        return _refused(request, principal)
    sessions = request.app.state.dashboard_sessions
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE,
        sessions.open(secret, principal),
        max_age=sessions.max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@pages.post("/logout")
async def logout() -> Response:
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@pages.get("")
async def dashboard(
    request: Request, principal: PagePrincipal, service: DashboardDep, days: Days = 30
) -> Response:
    if principal is None:
        return RedirectResponse(LOGIN, status_code=303)
    if principal.role is not Role.OPS:
        return _refused(request, principal)
    data = await service.overview(days=days)
    return _page(request, "dashboard.html", data=data, days=days, who=principal.name)


@pages.get("/static/{name}")
async def static_file(request: Request, name: str, principal: PagePrincipal) -> Response:
    if principal is None:
        return Response("log in at /dashboard/login\n", status_code=401, media_type="text/plain")
    if principal.role is not Role.OPS:
        return _refused(request, principal)
    if name not in _FILES:
        return Response("not found\n", status_code=404, media_type="text/plain")
    path, media_type = _FILES[name]
    return FileResponse(_STATIC / path, media_type=media_type, headers=_HEADERS)


@router.get("/dashboard", response_model=DashboardOut)
async def dashboard_data(service: DashboardDep, _: OpsRole, days: Days = 30) -> DashboardOut:
    return await service.overview(days=days)
