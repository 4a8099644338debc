"""The OpenAPI spec: behind a token by default, true to the server's status codes and security
scheme, and checked against the running server by a bounded, seeded schemathesis run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.app import create_app
from server.config import Settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server

DOCS = ("/openapi.json", "/docs", "/redoc")


def test_docs_need_a_token_of_any_role_unless_public(
    client: TestClient, auth, settings: Settings
) -> None:
    for path in DOCS:
        response = client.get(path)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_token"
        for role in ("ide", "ci", "ops"):
            assert client.get(path, headers=auth[role]).status_code == 200, (path, role)
    public = settings.model_copy(update={"public_docs": True})
    with TestClient(create_app(public, engine=FakeEngine())) as open_client:
        for path in DOCS:
            assert open_client.get(path).status_code == 200, path
        assert open_client.get("/v1/models").status_code == 401  # only the docs are opened


def _spec(client: TestClient, auth) -> dict[str, Any]:
    response = client.get("/openapi.json", headers=auth["ci"])
    assert response.status_code == 200
    return response.json()


def test_spec_documents_400_not_fastapis_422(client: TestClient, auth) -> None:
    spec = _spec(client, auth)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if "422" in responses:  # only where the server really answers 422 (adapter refused)
                assert (method, path) in {
                    ("post", "/v1/adapters/{name}/promote"),
                    ("put", "/v1/rollout"),
                }
            if "requestBody" in operation or operation.get("parameters"):
                assert "400" in responses, (method, path)
            if "requestBody" in operation:
                assert "413" in responses, (method, path)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    bad = spec["paths"]["/v1/completions"]["post"]["responses"]["400"]
    assert bad["content"]["application/json"]["schema"] == error_ref


def test_spec_has_the_bearer_scheme_on_every_guarded_operation(client: TestClient, auth) -> None:
    spec = _spec(client, auth)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            guarded = path.startswith("/v1/") or path == "/metrics"
            assert bool(operation.get("security")) == guarded, (method, path)
            assert ("401" in operation["responses"]) == guarded, (method, path)
            if guarded:
                assert operation["security"] == [{"bearerAuth": []}]
                assert "Retry-After" in operation["responses"]["429"]["headers"]


def test_spec_lists_each_operations_own_errors(client: TestClient, auth) -> None:
    paths = _spec(client, auth)["paths"]

    def codes(method: str, path: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"404", "503"} <= codes("post", "/v1/completions")
    assert {"404", "409", "422"} <= codes("post", "/v1/adapters/{name}/promote")
    assert "409" in codes("post", "/v1/rollout/rollback")
    assert "404" in codes("get", "/v1/completions/{completion_id}")
    assert "404" in codes("post", "/v1/events")
    # A role-restricted route promises a 403; a route any role may use would not. Every role
    # but a scraper's (metrics) may list models, so a 403 is promised there too.
    assert "403" in codes("get", "/v1/models")
    assert "403" in codes("get", "/v1/adapters")
    assert "403" in codes("get", "/metrics")
    streamed = paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}


def test_spec_carries_the_configured_maxima(settings: Settings) -> None:
    configured = settings.model_copy(update={"max_n": 3, "max_tokens_limit": 100})
    models = create_app(configured, engine=FakeEngine()).openapi()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        assert models[name]["properties"]["n"]["maximum"] == 3
        assert models[name]["properties"]["max_tokens"]["maximum"] == 100
    assert models["ChatCompletionRequest"]["properties"]["max_completion_tokens"]["maximum"] == 100


# ------------------------------------------------------------------ schemathesis

# Examples per operation. Seeded (derandomize) so a failure reproduces; with two dozen
# operations this is about 600 requests, well under a minute on two cores.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The spec is the app's own (building it starts nothing), so the operations are known when
# pytest collects; the live server is asked for it too, and must serve the same.
SPEC = create_app(Settings(_env_file=None), engine=FakeEngine()).openapi()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = [result.ok().label for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """One server for the whole run, with an ops token (it may call every endpoint) and the
    per-token limits off, so every example reaches the route it is meant for."""
    home = tmp_path_factory.mktemp("openapi")
    url = f"sqlite:///{home / 'kaizen.db'}"
    upgrade(url)
    db = make_engine(url)
    with make_session_factory(db)() as session:
        _, secret = create_token(session=session, name="schemathesis", role=Role.OPS)
    db.dispose()
    app_settings = Settings(
        _env_file=None,
        home=home,
        database_url=url,  # type: ignore[call-arg]
        rate_limit_per_minute=0,
        max_concurrent_per_token=0,
    )
    with live_server(create_app(app_settings, engine=FakeEngine())) as server:
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/openapi.json", headers=headers).json() == SPEC
        yield server.url, headers


def test_the_run_covers_every_operation() -> None:
    assert len(OPERATIONS) == sum(len(ops) for ops in SPEC["paths"].values()) >= 17


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("label", "body"),
    [
        ("POST /v1/completions", {"prompt": "def f():\n    ", "suffix": "\n", "n": 2}),
        ("POST /v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    ],
)
def test_completions_json_and_streamed_conform(
    live_api: tuple[str, dict[str, str]], label: str, body: dict[str, Any], stream: bool
) -> None:
    """The 200s, fixed rather than left to chance: JSON, and every server-sent event (chunks,
    the usage chunk, [DONE]) against the event schema."""
    url, headers = live_api
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None
    payload = {
        **body,
        "model": "fake-model",
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    response = operation.Case(body=payload).call_and_validate(
        base_url=url, headers=headers, checks=CHECKS
    )
    assert response.status_code == 200
    expected = "text/event-stream" if stream else "application/json"
    assert response.headers["content-type"][0].startswith(expected)


def _served_model(case: Any) -> Any:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "fake-model"
    return case


@pytest.mark.parametrize("label", OPERATIONS)
def test_server_conforms_to_its_spec(label: str, live_api: tuple[str, dict[str, str]]) -> None:
    """Valid and invalid requests alike: no 5xx, and every answer's status code, content type,
    headers and body are ones the spec documents."""
    url, headers = live_api
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None
    valid = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    cases = st.one_of(
        valid,
        # A generated `model` is never the served one (404): also send the real name, so that
        # valid requests reach the engine and their 200s (JSON and streamed) are checked too.
        valid.map(_served_model),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)

    run()
