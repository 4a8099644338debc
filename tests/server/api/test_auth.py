"""Every endpoint but health needs a bearer token with the right role."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.store.tokens import revoke_token

COMPLETION = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


def test_health_is_open(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")  # its dependency details are tested in test_outage.py
    assert ready.status_code == 200
    assert (ready.json()["status"], ready.json()["model"]) == ("ready", "fake-model")


def test_missing_token_is_401(client: TestClient) -> None:
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_token"
    assert client.get("/v1/models").status_code == 401


def test_unknown_token_is_401(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer kz_not-a-token"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"


def test_ci_token_cannot_complete(client: TestClient, auth) -> None:
    response = client.post("/v1/completions", json=COMPLETION, headers=auth["ci"])
    assert response.status_code == 403
    assert "role ide, ops" in response.json()["error"]["message"]
    chat = client.post(
        "/v1/chat/completions",
        headers=auth["ci"],
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 403


def test_ide_and_ops_tokens_can_complete(client: TestClient, auth) -> None:
    for role in ("ide", "ops"):
        assert (
            client.post("/v1/completions", json=COMPLETION, headers=auth[role]).status_code == 200
        )


def test_revoked_token_is_refused(client: TestClient, auth, session_factory) -> None:
    assert client.post("/v1/completions", json=COMPLETION, headers=auth["ide"]).status_code == 200
    with session_factory() as session:
        revoke_token(session=session, token_id=1)  # the ide token, created first
    response = client.post("/v1/completions", json=COMPLETION, headers=auth["ide"])
    assert response.status_code == 401


def test_refused_requests_leave_no_record(client: TestClient, auth) -> None:
    client.post("/v1/completions", json=COMPLETION)
    client.post("/v1/completions", json=COMPLETION, headers=auth["ci"])
    client.post("/v1/completions", json={"model": "fake-model", "prompt": ""}, headers=auth["ide"])
    client.portal.call(client.app.state.recorder.flush)
    assert client.app.state.recorder.written == 0
