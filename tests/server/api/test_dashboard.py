"""The dashboard's HTTP side: the login form and its session cookie, which the guard accepts on
the dashboard's paths only and for reads only; the pages' refusals; ``GET /v1/dashboard`` and
``GET /v1/rounds``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.services.sessions import COOKIE
from server.store.rounds import start_round, update_round
from server.store.tokens import revoke_token
from tests.utils.dashboard_rows import completion, event, outcome, registry_history


def _login(client: TestClient, secret: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/dashboard/login",
        content=f"token={secret}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )


def test_login_sets_a_strict_httponly_session_that_holds_no_token(
    client: TestClient, tokens: dict[str, str]
) -> None:
    response = _login(client, tokens["ops"])
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=v1.")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert tokens["ops"] not in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200 and "Kaizen ops dashboard" in page.text
    assert client.get("/v1/dashboard").status_code == 200
    assert client.get("/dashboard/static/uplot.js").status_code == 200
    # Elsewhere the cookie is no token: the API still wants a bearer header.
    assert client.get("/v1/rounds").status_code == 401
    assert client.get("/v1/adapters").status_code == 401
    # ... and it never authenticates a write, even on the dashboard's paths.
    assert client.post("/v1/dashboard").status_code == 401


@pytest.mark.parametrize("role", ["ide", "ci", "metrics"])
def test_other_roles_are_refused_with_a_page(
    client: TestClient, tokens: dict[str, str], auth: dict[str, dict[str, str]], role: str
) -> None:
    refused = _login(client, tokens[role])
    assert refused.status_code == 403
    assert "needs an ops token" in refused.text and f"role <strong>{role}</strong>" in refused.text
    assert COOKIE not in refused.headers.get("set-cookie", "")
    assert client.get("/dashboard", headers=auth[role]).status_code == 403
    assert client.get("/v1/dashboard", headers=auth[role]).status_code == 403
    assert client.get("/v1/rounds", headers=auth[role]).status_code == 403


def test_without_a_valid_session_the_page_asks_to_log_in(
    client: TestClient, tokens: dict[str, str], session_factory
) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/dashboard", follow_redirects=False).headers["location"] == (
        "/dashboard/login"
    )
    assert client.get("/v1/dashboard").status_code == 401
    assert client.get("/dashboard/static/dashboard.js").status_code == 401
    bad = _login(client, "kz_not-a-token")
    assert bad.status_code == 401 and "Invalid or revoked token" in bad.text
    _login(client, tokens["ops"])
    value = client.cookies[COOKIE]
    version, token_id, expires, signature = value.split(".")
    for forged in (
        f"v1.{token_id}.{int(expires) + 3600}.{signature}",  # a longer session
        f"v1.{token_id}.{expires}.{'0' * 64}",
        f"v1.{int(token_id) + 1}.{expires}.{signature}",  # another token's
    ):
        client.cookies.set(COOKIE, forged)
        assert client.get("/v1/dashboard").status_code == 401, forged
        assert client.get("/dashboard", follow_redirects=False).status_code == 303
    client.cookies.set(COOKIE, value)
    assert client.get("/v1/dashboard").status_code == 200
    with session_factory() as session:  # a revoked token's sessions end with it
        revoke_token(session=session, token_id=int(token_id))
    assert client.get("/v1/dashboard").status_code == 401


def test_a_session_expires(client: TestClient, tokens: dict[str, str]) -> None:
    sessions = client.app.state.dashboard_sessions  # type: ignore[attr-defined]
    _login(client, tokens["ops"])
    assert client.get("/v1/dashboard").status_code == 200
    sessions._clock = lambda: datetime.now(UTC).timestamp() + sessions.max_age + 1
    assert client.get("/v1/dashboard").status_code == 401


def test_a_database_outage_is_a_503_not_a_new_login(
    client: TestClient, tokens: dict[str, str]
) -> None:
    from sqlalchemy.exc import OperationalError

    _login(client, tokens["ops"])
    sessions = client.app.state.dashboard_sessions  # type: ignore[attr-defined]

    def down():  # type: ignore[no-untyped-def]
        raise OperationalError("SELECT 1", None, ConnectionRefusedError("database down"))

    sessions._session_factory = down
    response = client.get("/v1/dashboard")
    assert response.status_code == 503 and "Retry-After" in response.headers


def test_login_from_another_site_is_refused(client: TestClient, tokens: dict[str, str]) -> None:
    response = client.post(
        "/dashboard/login",
        content=f"token={tokens['ops']}",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "https://evil.example",
        },
        follow_redirects=False,
    )
    assert response.status_code == 403 and COOKIE not in response.headers.get("set-cookie", "")


def test_rounds_and_dashboard_data(
    client: TestClient, auth: dict[str, dict[str, str]], session_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ids = registry_history(session_factory, tmp_path / "adapters")
    now = datetime.now(UTC)
    with session_factory() as s:
        for i, days_ago in enumerate((2, 1, 0)):
            cid = f"c{i}"
            completion(s, cid, adapter="kaizen-r0", at=now - timedelta(days=days_ago, minutes=1))
            event(s, cid, "accepted", now)
            outcome(s, cid, "passed" if i else "failed", at=now)
    rounds = client.get("/v1/rounds", headers=auth["ops"])
    assert rounds.status_code == 200
    body = rounds.json()
    assert body["count"] == 1
    r = body["data"][0]
    assert r["adapter"] == "kaizen-r1" and r["parent"] == "kaizen-r0" and r["status"] == "succeeded"
    assert [(s["label"], s["count"]) for s in r["funnel_steps"]] == [
        ("records", 80),
        ("verdicts", 64),
        ("pairs", 30),
        ("selected", 18),
        ("trained", 18),
    ]
    assert r["pairs_by_source"] == {"fix": 6, "resample": 20, "ci_resample": 4}
    assert r["gate"]["decision"] == "approved"
    assert [
        (b["suite"], b["lower_points"]) for b in [r["gate"]["pooled"], *r["gate"]["suites"]]
    ] == [
        ("pooled", 1.2),
        ("mbpp_dev", -0.5),
        ("recorded", -4.0),
    ]
    assert r["gate_changes"] == ["kaizen-r1 is the canary"]

    data = client.get("/v1/dashboard", params={"days": 7}, headers=auth["ops"]).json()
    [series] = data["series"]
    assert series["adapter"] == "kaizen-r0"
    assert [p["acceptance_rate"] for p in series["points"]] == [1.0, 1.0, 1.0]
    assert [p["ci_pass_rate"] for p in series["points"]] == [0.0, 1.0, 1.0]
    assert [e["kind"] for e in data["events"]] == [
        "canary_started",
        "promoted",
        "canary_started",
        "rolled_back",
        "canary_started",
    ]
    assert data["canary"]["canary"] == "kaizen-r2" and data["canary"]["active"] == "kaizen-r0"
    assert data["canary"]["action"] == "wait"
    assert {(n["name"], n["parent"]) for n in data["lineage"]} == {
        ("kaizen-r0", None),
        ("kaizen-r1", "kaizen-r0"),
        ("kaizen-r2", "kaizen-r0"),
    }
    assert len(ids) == 3
    page = client.get("/dashboard", headers=auth["ops"])
    assert page.status_code == 200
    assert 'data-step="records" data-count="80"' in page.text
    assert 'data-adapter="kaizen-r1" data-parent="kaizen-r0"' in page.text
    assert client.get("/v1/rounds", params={"limit": 0}, headers=auth["ops"]).status_code == 400


def test_a_round_that_stopped_early_shows_what_it_reached(
    client: TestClient, auth: dict[str, dict[str, str]], session_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as s:
        row = start_round(
            session=s,
            trigger="schedule",
            records_until=datetime.now(UTC),
            parent_adapter_id=None,
            work_dir=str(tmp_path),
            config={},
        )
        update_round(
            session=s,
            round_id=row.id,
            status="skipped",
            funnel={"outcome_records": 3, "records_with_verdict": 0},
            error="no pairs",
        )
    [r] = client.get("/v1/rounds", headers=auth["ops"]).json()["data"]
    assert [s["count"] for s in r["funnel_steps"]] == [3, 0, None, None, None]
    assert r["gate"] is None and r["adapter"] is None and r["error"] == "no pairs"
    page = client.get("/dashboard", headers=auth["ops"])
    assert page.status_code == 200
    assert 'data-step="pairs" data-count=""' in page.text and "No canary is running" in page.text


def test_a_rounds_judge_agreement_is_shown(
    client: TestClient, auth: dict[str, dict[str, str]], session_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    judge = {
        "judge": "qwen2.5-coder-0.5b-instruct",
        "prompt_version": "q3-v2",
        "agreement": {"judged": 64, "agreement": 0.3906, "majority": 0.6094},
        "min_agreement": 0.75,
        "used": False,
        "pairs": 0,
    }
    with session_factory() as s:
        row = start_round(
            session=s,
            trigger="schedule",
            records_until=datetime.now(UTC),
            parent_adapter_id=None,
            work_dir=str(tmp_path),
            config={},
        )
        update_round(
            session=s,
            round_id=row.id,
            status="dry_run",
            funnel={"pairs": {"pairs": 3, "judge": judge}, "judge_agreement": 0.3906},
        )
    [r] = client.get("/v1/rounds", headers=auth["ops"]).json()["data"]
    assert r["funnel"]["judge_agreement"] == 0.3906
    page = client.get("/dashboard", headers=auth["ops"])
    assert page.status_code == 200
    assert 'class="judge" data-used="false" data-agreement="0.3906"' in page.text
    assert "39.1%" in page.text and "of 64 sealed verdicts" in page.text
    assert "needs 75%" in page.text and "no judge pairs" in page.text


def test_vendored_files_match_their_recorded_checksums() -> None:
    import hashlib
    import re

    vendor = Path(__file__).resolve().parents[3] / "server/api/static/vendor"
    recorded = re.findall(r"^([0-9a-f]{64})  (\S+)$", (vendor / "VENDORED.md").read_text(), re.M)
    assert len(recorded) == 3
    for digest, name in recorded:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
