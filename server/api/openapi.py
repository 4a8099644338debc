"""The OpenAPI spec as the server behaves, not as FastAPI assumes it does.

FastAPI documents a 422 for every route with input, while our handlers answer bad input with a
400 in the one error shape, and it cannot see what the request guard (server/api/guard.py)
answers before a route runs. So the spec is generated as usual, then every operation gets:

- 400 where it takes a body or parameters (FastAPI's 422 and its schemas are dropped);
- 413 where it takes a body (``KAIZEN_MAX_BODY_BYTES``);
- 401, 429 and 503 (both with ``Retry-After``) where it needs a token (checking one reads the
  database), and 403 where its role check admits fewer than all roles (read off the
  ``require_roles`` dependency).

Route-specific answers (404, 409, 422, 503) are declared on the routes with :func:`errors`.
Request schemas get the configured maxima of ``n`` and ``max_tokens`` (KAIZEN_MAX_N,
KAIZEN_MAX_TOKENS_LIMIT), which pydantic's static models cannot know.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from server.config import Settings
from server.protocol.completions import ChatCompletionChunk, ErrorResponse
from server.store.tokens import Role

# Models the spec refers to that no route's response_model brings in.
_MODELS: tuple[type[BaseModel], ...] = (ErrorResponse, ChatCompletionChunk)
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
_GENERIC = {
    400: "Bad input: malformed JSON, a missing or invalid field, a value the server does not "
    "support (`param` names it).",
    401: "A missing, invalid or revoked bearer token.",
    403: "The token's role may not use this endpoint.",
    413: "The request body is larger than KAIZEN_MAX_BODY_BYTES.",
    429: "The token's request rate or number of requests in flight is over this replica's limit.",
    503: "The database is unavailable; retry after Retry-After seconds.",
}


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's own error answers: ``{404: "when"}`` to OpenAPI responses
    in the error shape (429 and 503 carry ``Retry-After``)."""
    return {status: _error_response(status, text) for status, text in described.items()}


def streamed(chunk: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that streams ``chunk``s as server-sent events when asked:
    each event's ``data`` is a chunk, a final error object, or ``[DONE]``. (Before OpenAPI 3.2,
    the ``schema`` of ``text/event-stream`` describes one event.) ``chunk`` must be one of
    :data:`_MODELS` so that the spec defines it."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"}, _ERROR_REF]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "not": {"const": "[DONE]"},
                        "contentMediaType": "application/json",
                        "contentSchema": payload,
                    },
                ]
            }
        },
    }
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


def _error_response(status: int, description: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) return the corrected spec, with this
    server's configured limits on ``n`` and ``max_tokens``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _document_errors(schema, app.routes)
            _document_limits(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(schema: dict[str, Any], routes: list[Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in _MODELS:
        definition = model.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization"
        )
        for name, inner in definition.pop("$defs", {}).items():
            components.setdefault(name, inner)
        components.setdefault(model.__name__, definition)
    all_roles = frozenset(Role)
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if _is_fastapi_422(responses.get("422")):
                del responses["422"]
            wanted = []
            if route.body_field is not None or operation.get("parameters"):
                wanted.append(400)
            if route.body_field is not None:
                wanted.append(413)
            if operation.get("security"):
                wanted += [401, 429, 503]  # 503: authentication reads the database
                roles = _roles(route.dependant)
                if roles is not None and roles != all_roles:
                    wanted.append(403)
            for status in wanted:
                responses.setdefault(str(status), _error_response(status, _GENERIC[status]))
            operation["responses"] = dict(sorted(responses.items()))
    if not _mentions(schema["paths"], "#/components/schemas/HTTPValidationError"):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def _document_limits(schema: dict[str, Any], settings: Settings) -> None:
    models = schema.get("components", {}).get("schemas", {})
    limits = {
        "n": settings.max_n,
        "max_tokens": settings.max_tokens_limit,
        "max_completion_tokens": settings.max_tokens_limit,
    }
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = models.get(name, {}).get("properties", {})
        for field, maximum in limits.items():
            if field in properties:  # beside an anyOf with null, it bounds the integer
                properties[field]["maximum"] = maximum


def _is_fastapi_422(response: dict[str, Any] | None) -> bool:
    return response is not None and _mentions(response, "HTTPValidationError")


def _mentions(tree: Any, needle: str) -> bool:
    if isinstance(tree, dict):
        return any(_mentions(v, needle) for v in tree.values())
    if isinstance(tree, list):
        return any(_mentions(v, needle) for v in tree)
    return isinstance(tree, str) and needle in tree


def _roles(dependant: Dependant) -> frozenset[Role] | None:
    """The roles a route's ``require_roles`` dependency admits (None: no role check)."""
    for dependency in dependant.dependencies:
        roles = getattr(dependency.call, "roles", None)
        if roles is not None:
            return frozenset(roles)
        inner = _roles(dependency)
        if inner is not None:
            return inner
    return None
