"""The request guard: an ASGI middleware that runs before FastAPI reads a request's body.

FastAPI parses a JSON body before it runs any dependency, so a route's auth dependency comes too
late to stop an anonymous client from having its body parsed (and from learning, by a 400, what
the server thinks of it). The guard therefore, in this order:

1. authenticates ``/v1/*`` and ``/metrics`` (and the API docs, unless ``KAIZEN_PUBLIC_DOCS``):
   401. On the dashboard's paths (``session_paths``) a dashboard session cookie
   (:mod:`server.services.sessions`) stands in for the bearer header in GET requests, since a
   browser sends none when it navigates; dashboard pages outside ``/v1`` are authenticated
   when they bring a header or a cookie, and send the browser to their login form otherwise;
2. applies the token's request-rate and in-flight limits: 429 with ``Retry-After``;
3. reads the body itself, refusing one over ``KAIZEN_MAX_BODY_BYTES`` by its ``Content-Length``
   before reading a byte, or as it streams in when chunked: 413;
4. refuses a JSON body with a lone UTF-16 surrogate (``"\\ud800"``), which Python's JSON parser
   accepts but nothing downstream can encode: 400 naming the field.

Role checks (403) stay in the routes' dependencies: only the route knows which roles it admits.
Errors are answered by the app's own exception handlers, so they have the one error shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import PRINCIPAL_STATE_KEY, authenticate, authenticate_session
from server.api.limits import TokenLimiter, retry_after
from server.config import Settings
from server.errors import ApiError
from server.services.sessions import COOKIE
from server.store.tokens import Principal

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"  # Prometheus' conventional path, outside /v1, guarded like it

# A JSON escape of a UTF-16 surrogate half; only bodies that contain one are parsed here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class RequestGuard:
    """See the module docstring. ``docs_paths``: the spec and docs pages to authenticate too;
    ``session_paths``: the dashboard's path prefixes, where a session cookie is accepted."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        limiter: TokenLimiter,
        docs_paths: Iterable[str] = (),
        session_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.settings = settings
        self.limiter = limiter
        self.docs_paths = frozenset() if settings.public_docs else frozenset(docs_paths)
        self.session_paths = tuple(session_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal: Principal | None = None
        try:
            if self._needs_token(scope["path"]):
                principal = await self._authenticate(scope)
            elif self._takes_session(scope["path"]) and self._credentials(scope):
                principal = await self._authenticate_page(scope)
            if principal is not None:
                self._admit(principal)
        except Exception as exc:
            await self._answer(scope, receive, send, exc)
            return
        if principal is None:
            await self._forward(scope, receive, send)
            return
        scope = {**scope, "state": {**scope.get("state", {}), PRINCIPAL_STATE_KEY: principal}}
        try:
            await self._forward(scope, receive, send)
        finally:  # a stream holds its slot until its last byte is sent or the client leaves
            self.limiter.leave(principal.token_id)

    def _needs_token(self, path: str) -> bool:
        v1 = path == "/v1" or path.startswith("/v1/")
        return v1 or path == METRICS_PATH or path in self.docs_paths

    def _takes_session(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.session_paths)

    def _session_cookie(self, scope: Scope) -> str | None:
        # Reads only: a cookie never authenticates a request that changes something (CSRF).
        if scope["method"] not in ("GET", "HEAD") or not self._takes_session(scope["path"]):
            return None
        return _cookie(scope, COOKIE)

    def _credentials(self, scope: Scope) -> bool:
        return _header(scope, b"authorization") is not None or bool(self._session_cookie(scope))

    async def _authenticate(self, scope: Scope) -> Principal:
        header = _header(scope, b"authorization")
        cookie = self._session_cookie(scope) if header is None else None
        if cookie:
            return await authenticate_session(cookie, scope["app"].state.dashboard_sessions)
        return await authenticate(header, scope["app"].state.authenticator)

    async def _authenticate_page(self, scope: Scope) -> Principal | None:
        """A dashboard page's principal; None (the page asks to log in) for a bad session."""
        try:
            return await self._authenticate(scope)
        except ApiError as exc:
            if exc.status != 401:
                raise
            return None

    def _admit(self, principal: Principal) -> None:
        """Spend a request from the token's rate and take an in-flight slot, or raise 429."""
        wait = self.limiter.take(principal.token_id)
        if wait is not None:
            log.info("event=rate_limited token_id=%d wait_s=%.1f", principal.token_id, wait)
            raise ApiError(
                429,
                f"Too many requests for this token: this server replica allows "
                f"{self.settings.rate_limit_per_minute:g} per minute (bursts of "
                f"{self.settings.rate_limit_burst}); retry after the Retry-After seconds. "
                "Operators set KAIZEN_RATE_LIMIT_PER_MINUTE and KAIZEN_RATE_LIMIT_BURST.",
                code="rate_limit_exceeded",
                headers={"Retry-After": retry_after(wait)},
            )
        if not self.limiter.enter(principal.token_id):
            log.info("event=concurrency_limited token_id=%d", principal.token_id)
            raise ApiError(
                429,
                f"This token already has {self.limiter.max_in_flight} requests in flight, the "
                "most this server replica allows; wait for one to finish (or cancel it). "
                "Operators set KAIZEN_MAX_CONCURRENT_PER_TOKEN.",
                code="too_many_concurrent_requests",
                headers={"Retry-After": "1"},
            )

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read and check the body, then run the app with the body replayed to it."""
        try:
            body = await self._read_body(scope, receive)
        except Exception as exc:
            await self._answer(scope, receive, send, exc)
            return
        if body is None:
            return  # the client hung up while sending; nobody is left to answer
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked, or a Content-Length that undercounts
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body):
            _check_unicode(body)
        return body

    async def _answer(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """Answer ``exc`` with the app's exception handler for it, as a route's error would be
        (the handlers that FastAPI installs sit inside this middleware, so they would not see
        it). Without a handler it propagates to the server's error middleware."""
        handlers: dict[Any, Any] = getattr(scope["app"], "exception_handlers", {})
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    header = _header(scope, b"cookie")
    if header is None:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes); send less "
        "context (operators set KAIZEN_MAX_BODY_BYTES).",
        code="request_too_large",
    )


def _check_unicode(body: bytes) -> None:
    """Raise a 400 naming the first string (or key) of a JSON body that holds a lone surrogate.
    A body that does not parse is left to FastAPI, which answers it with its own 400."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:  # iterative: nesting as deep as the parser allows must not overflow here
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise _lone_surrogate(path)
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                inner = f"{path}.{key}" if path else str(key)
                if not _encodable(key):
                    raise _lone_surrogate(path or "body")
                stack.append((inner, item))
        elif isinstance(value, list):
            for i in reversed(range(len(value))):
                stack.append((f"{path}.{i}" if path else str(i), value[i]))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(param: str) -> ApiError:
    return ApiError(
        400,
        f"'{param}' contains a lone UTF-16 surrogate (an escape such as \\ud800 without its "
        "pair), which is not text; send valid Unicode.",
        param=param or None,
        code="invalid_unicode",
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the client's own messages
    (the disconnect that aborts a generation whose client went away)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
