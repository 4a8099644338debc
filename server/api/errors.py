"""One error shape for every failure: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import ApiError
from server.protocol.completions import ErrorDetail, ErrorResponse
from server.store.journal import DatabaseUnavailableError, is_database_unavailable

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(
            message=message, type=_TYPES.get(status, "api_error"), param=param, code=code
        )
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _param_path(error: dict[str, Any], body: Any) -> list[str]:
    """The parameter an error is about, as the client wrote it: ``messages.0.content``.

    Pydantic's ``loc`` also names the alternative of a union it tried (``stop`` → ``str`` or
    ``list[str]``); those parts index nothing in the body, so following the body drops them.
    """
    where, *rest = error.get("loc") or ("",)
    if where != "body":  # query, path, header: the name is the parameter
        return [str(part) for part in rest]
    path, node = [], body
    for i, part in enumerate(rest):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            path.append(str(part))
            node = node[part]
        elif i == len(rest) - 1 and error.get("type") == "missing":
            path.append(str(part))  # a required field the body lacks
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    if errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        return f"Malformed JSON body: {ctx.get('error', 'cannot parse')}.", None
    # Pydantic reports each alternative of a union that failed; the one that got furthest into
    # the body is what the client meant (for stop=["a", 1], the list, not the string).
    located = [(_param_path(e, exc.body), e) for e in errors]
    loc, first = max(located, key=lambda pair: len(pair[0]))
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid request: {where}{first.get('msg', 'invalid value')}{more}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(DatabaseUnavailableError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # An outage is the client's cue to retry, not a server bug: 503 with Retry-After.
        if not is_database_unavailable(exc):
            log.exception("event=unhandled_error path=%s", request.url.path)
            return error_response(500, "Internal server error; the server log has the details.")
        log.warning("event=database_unavailable path=%s", request.url.path)
        retry_after = getattr(exc, "retry_after", 5)
        message = (
            str(exc)
            if isinstance(exc, DatabaseUnavailableError)
            else "The database is unavailable; retry in a few seconds."
        )
        return error_response(
            503, message, code="database_unavailable", headers={"Retry-After": str(retry_after)}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=unhandled_error path=%s", request.url.path)
        return error_response(500, "Internal server error; the server log has the details.")
