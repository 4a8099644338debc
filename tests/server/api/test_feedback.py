"""Feedback API: events, ledger, outcomes, a completion's history and stats (fake engine)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from tests.utils.fake_engine import FakeEngine

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
REPO = "github.com/acme/app"


def _complete(client: TestClient, auth, model: str = "fake-model") -> str:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/completions",
        headers=auth["ide"],
        json={
            "model": model,
            "prompt": "def add(a, b):\n    ",
            "max_tokens": 9,
            "context": {"repository": REPO, "file_path": "src/calc.py"},
        },
    )
    assert response.status_code == 200
    return response.json()["id"]


def _event(cid: str, type_: str, **extra: object) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "completion_id": cid,
        "type": type_,
        "timestamp": NOW.isoformat(),
        **extra,
    }


def _entry(cid: str, text: str, at: datetime = NOW, **extra: object) -> dict[str, object]:
    return {
        "completion_id": cid,
        "repository": REPO,
        "file_path": "src/calc.py",
        "inserted_text": "return a - b",
        "current_text": text,
        "start_offset": 20,
        "updated_at": at.isoformat(),
        **extra,
    }


def _outcome(run_id: str, cid: str, status: str, text: str, **extra: object) -> dict:  # type: ignore[type-arg]
    return {
        "run_id": run_id,
        "repository": REPO,
        "commit": "9fceb02",
        "status": status,
        "tests": [
            {
                "name": "tests/test_calc.py::test_add",
                "status": status if status != "build_failed" else "error",
                "duration": 0.01,
            }
        ],
        "log_tail": "1 passed",
        **extra,
        "completions": [
            {
                "completion_id": cid,
                "file_path": "src/calc.py",
                "final_text": text,
                "status": status,
                "tests": ["tests/test_calc.py::test_add"],
            }
        ],
    }


@pytest.fixture
def cid(client: TestClient, auth) -> str:  # type: ignore[no-untyped-def]
    return _complete(client, auth)


def test_events_are_stored_once_and_unknown_ids_listed(client: TestClient, auth, cid) -> None:
    batch = {
        "events": [_event(cid, "shown"), _event(cid, "accepted"), _event("cmpl-unknown", "shown")]
    }
    first = client.post("/v1/events", headers=auth["ide"], json=batch)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "stored": 2,
        "duplicates": 0,
        "unknown_completion_ids": ["cmpl-unknown"],
        "refused": [],
    }
    retry = client.post("/v1/events", headers=auth["ide"], json=batch)
    assert retry.json() == {
        "stored": 0,
        "duplicates": 2,
        "unknown_completion_ids": ["cmpl-unknown"],
        "refused": [],
    }
    detail = client.get(f"/v1/completions/{cid}", headers=auth["ops"]).json()
    assert [e["type"] for e in detail["events"]] == ["shown", "accepted"]


def test_events_of_only_unknown_completions_are_404(client: TestClient, auth) -> None:
    response = client.post(
        "/v1/events", headers=auth["ide"], json={"events": [_event("cmpl-nope", "shown")]}
    )
    assert response.status_code == 404
    assert "cmpl-nope" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("event", "needle"),
    [
        ({"type": "edited"}, "needs text"),
        ({"type": "partially_accepted"}, "needs accepted_length"),
        ({"type": "clicked"}, "type"),
        ({"type": "shown", "timestamp": "2026-11-22T10:00:00"}, "timezone"),
        ({"type": "shown", "surprise": 1}, "surprise"),
    ],
)
def test_malformed_events_are_400(client: TestClient, auth, cid, event, needle) -> None:
    response = client.post(
        "/v1/events", headers=auth["ide"], json={"events": [{**_event(cid, "shown"), **event}]}
    )
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_feedback_endpoints_check_roles(client: TestClient, auth, cid) -> None:
    assert (
        client.post(
            "/v1/events", headers=auth["ci"], json={"events": [_event(cid, "shown")]}
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/v1/outcomes", headers=auth["ide"], json=_outcome("r1", cid, "passed", "x")
        ).status_code
        == 403
    )
    assert (
        client.get("/v1/ledger", headers=auth["ide"], params={"repository": REPO}).status_code
        == 403
    )
    assert client.get(f"/v1/completions/{cid}", headers=auth["ide"]).status_code == 403
    assert client.get("/v1/stats", headers=auth["ci"]).status_code == 403
    assert client.post("/v1/events", json={"events": []}).status_code == 401


def test_ledger_upserts_newest_and_serves_active_entries(client: TestClient, auth, cid) -> None:
    put = client.put(
        "/v1/ledger", headers=auth["ide"], json={"entries": [_entry(cid, "return a + b", NOW)]}
    )
    assert put.json() == {
        "stored": 1,
        "duplicates": 0,
        "unknown_completion_ids": [],
        "refused": [],
    }
    # An older update arriving late does not overwrite the newer text, and is answered so.
    stale = client.put(
        "/v1/ledger",
        headers=auth["ide"],
        json={"entries": [_entry(cid, "stale", NOW - timedelta(minutes=5))]},
    )
    assert stale.status_code == 200, stale.text
    assert stale.json()["stored"] == 0
    assert stale.json()["refused"] == [{"completion_id": cid, "choice_index": 0, "reason": "stale"}]
    # The same update again (a retried batch) is a duplicate, not stale.
    again = client.put(
        "/v1/ledger", headers=auth["ide"], json={"entries": [_entry(cid, "return a + b", NOW)]}
    )
    assert again.json() == {
        "stored": 0,
        "duplicates": 1,
        "unknown_completion_ids": [],
        "refused": [],
    }
    listed = client.get(
        "/v1/ledger",
        headers=auth["ci"],
        params={"repository": REPO, "since": (NOW - timedelta(days=1)).isoformat()},
    )
    assert listed.status_code == 200
    assert [e["current_text"] for e in listed.json()["data"]] == ["return a + b"]
    assert (
        client.get(
            "/v1/ledger",
            headers=auth["ci"],
            params={"repository": "github.com/other/repo", "since": NOW.isoformat()},
        ).json()["count"]
        == 0
    )
    client.put(
        "/v1/ledger",
        headers=auth["ide"],
        json={"entries": [_entry(cid, "", NOW + timedelta(minutes=1), state="removed")]},
    )
    assert (
        client.get(
            "/v1/ledger",
            headers=auth["ci"],
            params={"repository": REPO, "since": (NOW - timedelta(days=1)).isoformat()},
        ).json()["count"]
        == 0
    )
    unknown = client.put(
        "/v1/ledger", headers=auth["ide"], json={"entries": [_entry("cmpl-nope", "x")]}
    )
    assert unknown.status_code == 404


def test_outcomes_are_idempotent_and_keep_the_raw_report(client: TestClient, auth, cid) -> None:
    report = _outcome("github:1:1", cid, "failed", "return a - b")
    report["completions"].append(
        {"completion_id": "cmpl-gone", "file_path": "x.py", "final_text": "", "status": "failed"}
    )
    first = client.post("/v1/outcomes", headers=auth["ci"], json=report)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "run_id": "github:1:1",
        "duplicate": False,
        "completions": 1,
        "unknown_completion_ids": ["cmpl-gone"],
        "refused": [],
    }
    again = client.post("/v1/outcomes", headers=auth["ci"], json=report)
    assert again.json()["duplicate"] is True and again.json()["completions"] == 0
    with client.app.state.session_factory() as session:
        from sqlalchemy import select

        from server.store.models import CiRun

        run = session.scalars(select(CiRun).where(CiRun.run_id == "github:1:1")).one()
        assert run is not None and run.raw["completions"][1]["completion_id"] == "cmpl-gone"
        assert run.tests[0]["name"] == "tests/test_calc.py::test_add"


def test_bad_outcome_reports_are_400(client: TestClient, auth, cid) -> None:
    bad = _outcome("r", cid, "passed", "x")
    bad["status"] = "green"
    response = client.post("/v1/outcomes", headers=auth["ci"], json=bad)
    assert response.status_code == 400 and response.json()["error"]["param"] == "status"
    missing = _outcome("r", cid, "passed", "x")
    del missing["commit"]
    assert client.post("/v1/outcomes", headers=auth["ci"], json=missing).status_code == 400


def test_failure_then_fix_is_kept_with_both_texts(client: TestClient, auth, cid) -> None:
    client.post(
        "/v1/outcomes", headers=auth["ci"], json=_outcome("run-1", cid, "failed", "return a - b")
    )
    client.post(
        "/v1/outcomes", headers=auth["ci"], json=_outcome("run-2", cid, "passed", "return a + b")
    )
    detail = client.get(f"/v1/completions/{cid}", headers=auth["ops"])
    assert detail.status_code == 200
    outcomes = detail.json()["outcomes"]
    assert [(o["run_id"], o["status"], o["final_text"]) for o in outcomes] == [
        ("run-1", "failed", "return a - b"),
        ("run-2", "passed", "return a + b"),
    ]
    assert detail.json()["choices"][0]["text"] == "x = 0  # "
    assert client.get("/v1/completions/cmpl-nope", headers=auth["ops"]).status_code == 404


def test_stats_per_adapter(client: TestClient, auth, fake_engine: FakeEngine) -> None:
    base = [_complete(client, auth) for _ in range(4)]
    tuned = [_complete(client, auth, "test-adapter") for _ in range(2)]
    events = [_event(c, "shown") for c in base + tuned]
    events += [
        _event(base[0], "accepted"),
        _event(base[1], "partially_accepted", accepted_length=3),
        _event(tuned[0], "accepted"),
    ]
    client.post("/v1/events", headers=auth["ide"], json={"events": events})
    client.post("/v1/outcomes", headers=auth["ci"], json=_outcome("r1", base[0], "failed", "a"))
    client.post("/v1/outcomes", headers=auth["ci"], json=_outcome("r2", base[0], "passed", "b"))
    client.post("/v1/outcomes", headers=auth["ci"], json=_outcome("r3", base[1], "failed", "c"))
    client.post("/v1/outcomes", headers=auth["ci"], json=_outcome("r4", tuned[0], "passed", "d"))
    stats = client.get("/v1/stats", headers=auth["ops"])
    assert stats.status_code == 200, stats.text
    rows = {row["adapter"]: row for row in stats.json()["data"]}
    assert rows[None] == {
        "adapter": None,
        "completions": 4,
        "shown": 4,
        "accepted": 2,
        "acceptance_rate": 0.5,
        "with_outcome": 2,
        "passed": 1,
        "ci_pass_rate": 0.5,
    }
    assert rows["test-adapter"]["acceptance_rate"] == 0.5
    assert rows["test-adapter"]["ci_pass_rate"] == 1.0
    empty = client.get(
        "/v1/stats",
        headers=auth["ops"],
        params={"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"},
    )
    assert empty.json()["data"] == []
    assert (
        client.get(
            "/v1/stats",
            headers=auth["ops"],
            params={"since": "2021-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"},
        ).status_code
        == 400
    )


def test_feedback_right_after_the_completion_finds_it(
    client: TestClient, auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The IDE's `shown` can arrive before the recorder has written the completion: make the
    # recorder slow so that it always does.
    import time

    from server.services.recorder import Recorder

    write = Recorder._write

    def slow_write(self, batch):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        write(self, batch)

    monkeypatch.setattr(Recorder, "_write", slow_write)
    cid = _complete(client, auth)
    response = client.post(
        "/v1/events", headers=auth["ide"], json={"events": [_event(cid, "shown")]}
    )
    assert response.status_code == 200 and response.json()["stored"] == 1, response.text
