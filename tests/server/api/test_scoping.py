"""Who may write feedback on which completion, judged by the completion's *served* record: ci
tokens scoped to repositories, ide tokens to their owner's completions (real app, fake engine).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from server.store.models import CompletionEvent, CompletionOutcome, LedgerEntry
from server.store.tokens import Role, create_token
from tests.utils.records import flush

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
APP = "github.com/acme/app"
OTHER = "github.com/acme/secret"


def _token(session_factory, name: str, role: Role, repositories=None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        _, secret = create_token(session=session, name=name, role=role, repositories=repositories)
    return {"Authorization": f"Bearer {secret}"}


def _complete(client: TestClient, headers: dict[str, str], repository: str | None) -> str:
    context = {"file_path": "src/calc.py"}
    if repository is not None:
        context["repository"] = repository
    response = client.post(
        "/v1/completions",
        headers=headers,
        json={"model": "fake-model", "prompt": "def add(a, b):\n    ", "context": context},
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _event(cid: str, type_: str = "accepted") -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "completion_id": cid,
        "type": type_,
        "timestamp": NOW.isoformat(),
    }


def _entry(cid: str, text: str, at: datetime = NOW, repository: str = APP) -> dict[str, object]:
    return {
        "completion_id": cid,
        "repository": repository,
        "file_path": "src/calc.py",
        "inserted_text": "return a + b",
        "current_text": text,
        "updated_at": at.isoformat(),
    }


def _report(run_id: str, *cids: str, repository: str = APP) -> dict[str, object]:
    return {
        "run_id": run_id,
        "repository": repository,
        "commit": "9fceb02",
        "status": "passed",
        "completions": [
            {
                "completion_id": cid,
                "file_path": "src/calc.py",
                "final_text": "return a + b  # fixed",
                "status": "passed",
                "test_code": "assert add(1, 2) == 3",
            }
            for cid in cids
        ],
    }


def _outcomes(client: TestClient) -> dict[str, int]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        rows = session.query(CompletionOutcome).all()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.completion_id] = counts.get(row.completion_id, 0) + 1
        return counts


@pytest.fixture
def alice(session_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _token(session_factory, "alice", Role.IDE)


@pytest.fixture
def mallory(session_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _token(session_factory, "mallory", Role.IDE)


@pytest.fixture
def app_ci(session_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    # Given as a clone URL: the scope is stored normalised.
    return _token(session_factory, "app-ci", Role.CI, ["git@github.com:Acme/App.git"])


# --- ci tokens scoped to repositories ----------------------------------------------------------


def test_scoped_ci_reports_only_on_completions_served_in_its_repositories(
    client: TestClient, alice, app_ci
) -> None:
    ours = _complete(client, alice, APP)
    theirs = _complete(client, alice, OTHER)
    unscoped = _complete(client, alice, None)  # a client that sent no repository
    # The report *says* it is for APP; what counts is where each completion was served.
    response = client.post(
        "/v1/outcomes", headers=app_ci, json=_report("run-1", ours, theirs, unscoped, "cmpl-gone")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["completions"] == 1
    assert body["unknown_completion_ids"] == ["cmpl-gone"]
    assert sorted(body["refused"], key=lambda r: r["completion_id"]) == sorted(
        [
            {"completion_id": theirs, "choice_index": 0, "reason": "repository_not_in_scope"},
            {"completion_id": unscoped, "choice_index": 0, "reason": "repository_not_in_scope"},
        ],
        key=lambda r: r["completion_id"],
    )
    assert _outcomes(client) == {ours: 1}  # no verdict, final_text or test_code for the others


def test_scoped_ci_cannot_report_a_run_of_another_repository(
    client: TestClient, alice, app_ci
) -> None:
    theirs = _complete(client, alice, OTHER)
    response = client.post(
        "/v1/outcomes", headers=app_ci, json=_report("run-x", theirs, repository=OTHER)
    )
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "repository_not_in_scope"
    assert APP in error["message"] and f"--repo {OTHER}" in error["message"]
    assert _outcomes(client) == {}


def test_a_run_id_taken_in_one_repository_does_not_squat_it_in_another(
    client: TestClient, alice, app_ci, session_factory, auth
) -> None:
    """Run ids are per repository (CI numbers runs per project): app's CI posting run 7 first
    must not make secret's own run 7 a "duplicate" that is dropped."""
    secret_ci = _token(session_factory, "secret-ci", Role.CI, [OTHER])
    ours, theirs = _complete(client, alice, APP), _complete(client, alice, OTHER)
    first = client.post("/v1/outcomes", headers=app_ci, json=_report("7", ours))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    second = client.post(
        "/v1/outcomes", headers=secret_ci, json=_report("7", theirs, repository=OTHER)
    )
    assert second.status_code == 200, second.text
    assert second.json()["duplicate"] is False and second.json()["completions"] == 1
    assert _outcomes(client) == {ours: 1, theirs: 1}
    # A retry is still a duplicate, however the repository is spelt.
    again = client.post(
        "/v1/outcomes",
        headers=app_ci,
        json=_report("7", ours, repository="https://github.com/Acme/App.git"),
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert _outcomes(client) == {ours: 1, theirs: 1}
    history = client.get(f"/v1/completions/{theirs}", headers=auth["ops"])
    assert history.status_code == 200, history.text
    (outcome,) = history.json()["outcomes"]
    assert outcome["run_id"] == "7" and outcome["repository"] == OTHER


def test_scoped_ci_reads_only_its_repositories_ledgers(
    client: TestClient, alice, app_ci, auth
) -> None:
    ours = _complete(client, alice, APP)
    theirs = _complete(client, alice, OTHER)
    client.put("/v1/ledger", headers=alice, json={"entries": [_entry(ours, "a")]})
    client.put(
        "/v1/ledger", headers=alice, json={"entries": [_entry(theirs, "b", repository=OTHER)]}
    )
    since = (NOW - timedelta(days=1)).isoformat()
    mine = client.get("/v1/ledger", headers=app_ci, params={"repository": APP, "since": since})
    assert mine.status_code == 200, mine.text
    assert [e["completion_id"] for e in mine.json()["data"]] == [ours]
    # Any spelling of the repository is normalised first.
    spelled = client.get(
        "/v1/ledger",
        headers=app_ci,
        params={"repository": "https://github.com/Acme/App.git", "since": since},
    )
    assert spelled.json()["count"] == 1
    refused = client.get("/v1/ledger", headers=app_ci, params={"repository": OTHER, "since": since})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "repository_not_in_scope"
    # The conftest's ci token has every repository (tokens made before scoping keep theirs).
    assert (
        client.get(
            "/v1/ledger", headers=auth["ci"], params={"repository": OTHER, "since": since}
        ).json()["count"]
        == 1
    )


def test_scoped_ci_ledger_leaves_out_entries_served_elsewhere(
    client: TestClient, alice, app_ci, session_factory
) -> None:
    # An entry in APP's ledger whose completion was served in OTHER (written before the server
    # checked the repository of ledger entries): APP's CI could not report on it, so it does
    # not see it either.
    theirs = _complete(client, alice, OTHER)
    flush(client)  # the recorder writes the completion off the request path
    with session_factory() as session:
        session.add(
            LedgerEntry(
                completion_id=theirs,
                choice_index=0,
                repository=APP,
                file_path="src/calc.py",
                inserted_text="x",
                current_text="x",
                state="active",
                updated_at=NOW,
            )
        )
        session.commit()
    since = (NOW - timedelta(days=1)).isoformat()
    listed = client.get("/v1/ledger", headers=app_ci, params={"repository": APP, "since": since})
    assert listed.status_code == 200 and listed.json()["count"] == 0


def test_all_repos_ci_and_ops_keep_full_access(
    client: TestClient, alice, auth, session_factory
) -> None:
    everywhere = _token(session_factory, "shared-ci", Role.CI)  # repositories=None: all
    theirs = _complete(client, alice, OTHER)
    for run_id, headers in (("run-all", everywhere), ("run-ops", auth["ops"])):
        response = client.post("/v1/outcomes", headers=headers, json=_report(run_id, theirs))
        assert response.status_code == 200, response.text
        assert response.json()["completions"] == 1 and response.json()["refused"] == []


def test_a_token_scoped_to_two_repositories_reports_on_both(
    client: TestClient, alice, session_factory
) -> None:
    both = _token(session_factory, "mono-ci", Role.CI, [APP, OTHER])
    a, b = _complete(client, alice, APP), _complete(client, alice, OTHER)
    response = client.post("/v1/outcomes", headers=both, json=_report("run-2", a, b))
    assert response.json()["completions"] == 2 and response.json()["refused"] == []


# --- ide tokens and ownership ------------------------------------------------------------------


def test_events_only_for_the_owners_completions(client: TestClient, alice, mallory, auth) -> None:
    hers = _complete(client, alice, APP)
    his = _complete(client, mallory, APP)
    mixed = client.post("/v1/events", headers=mallory, json={"events": [_event(his), _event(hers)]})
    assert mixed.status_code == 200, mixed.text
    assert mixed.json()["stored"] == 1
    assert mixed.json()["refused"] == [
        {"completion_id": hers, "choice_index": 0, "reason": "not_owner"}
    ]
    only_hers = client.post("/v1/events", headers=mallory, json={"events": [_event(hers)]})
    assert only_hers.status_code == 403
    error = only_hers.json()["error"]
    assert error["code"] == "refused_completion" and hers in error["message"]
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert [e.completion_id for e in session.query(CompletionEvent).all()] == [his]
    # ops tokens keep full access.
    ops = client.post("/v1/events", headers=auth["ops"], json={"events": [_event(hers)]})
    assert ops.status_code == 200 and ops.json()["stored"] == 1, ops.text


def test_another_token_of_the_same_owner_may_write(
    client: TestClient, alice, session_factory
) -> None:
    cid = _complete(client, alice, APP)
    replacement = _token(session_factory, "alice", Role.IDE)  # e.g. after a revoke
    response = client.post("/v1/events", headers=replacement, json={"events": [_event(cid)]})
    assert response.status_code == 200 and response.json()["stored"] == 1, response.text
    put = client.put("/v1/ledger", headers=replacement, json={"entries": [_entry(cid, "a")]})
    assert put.status_code == 200 and put.json()["stored"] == 1, put.text
    # The owner is the exact name, not a prefix of it.
    lookalike = _token(session_factory, "alice2", Role.IDE)
    refused = client.post("/v1/events", headers=lookalike, json={"events": [_event(cid)]})
    assert refused.status_code == 403


def test_ledger_takeover_is_refused_and_the_owner_keeps_updating(
    client: TestClient, alice, mallory, auth
) -> None:
    cid = _complete(client, alice, APP)
    first = client.put("/v1/ledger", headers=alice, json={"entries": [_entry(cid, "mine")]})
    assert first.json()["stored"] == 1
    # The attack of issue 11: move it to another repository, stamped far in the future.
    future = datetime(2099, 1, 1, tzinfo=UTC)
    attack = client.put(
        "/v1/ledger",
        headers=mallory,
        json={"entries": [_entry(cid, "hijacked", future, repository="github.com/evil/x")]},
    )
    assert attack.status_code == 403
    assert attack.json()["error"]["code"] == "refused_completion"
    later = client.put(
        "/v1/ledger",
        headers=alice,
        json={"entries": [_entry(cid, "mine, edited", NOW + timedelta(minutes=1))]},
    )
    assert later.json()["stored"] == 1 and later.json()["refused"] == []
    detail = client.get(f"/v1/completions/{cid}", headers=auth["ops"]).json()
    assert [(e["repository"], e["current_text"]) for e in detail["ledger"]] == [
        (APP, "mine, edited")
    ]


def test_owner_cannot_move_an_entry_off_its_served_repository(client: TestClient, alice) -> None:
    cid = _complete(client, alice, APP)
    ok = client.put(
        "/v1/ledger",
        headers=alice,
        json={"entries": [_entry(cid, "a", repository="https://github.com/Acme/App.git")]},
    )
    assert ok.json()["stored"] == 1, ok.text  # the same repository, spelled as a URL
    moved = client.put(
        "/v1/ledger",
        headers=alice,
        json={"entries": [_entry(cid, "b", NOW + timedelta(minutes=1), repository=OTHER)]},
    )
    assert moved.status_code == 403
    assert "another repository" in moved.json()["error"]["message"]


def test_future_updated_at_is_clamped_to_the_receive_time(
    client: TestClient, alice, session_factory
) -> None:
    cid = _complete(client, alice, APP)
    before = datetime.now(UTC)
    skewed = client.put(
        "/v1/ledger",
        headers=alice,
        json={"entries": [_entry(cid, "from a fast clock", datetime(2099, 1, 1, tzinfo=UTC))]},
    )
    assert skewed.json()["stored"] == 1
    with session_factory() as session:
        stored = session.get(LedgerEntry, (cid, 0))
        assert stored is not None
        assert before <= stored.updated_at <= datetime.now(UTC)
    # So an update stamped by a correct clock a moment later still wins.
    later = client.put(
        "/v1/ledger",
        headers=alice,
        json={"entries": [_entry(cid, "a moment later", datetime.now(UTC) + timedelta(seconds=1))]},
    )
    assert later.json()["stored"] == 1 and later.json()["refused"] == []


def test_unknown_only_is_still_404_and_mixed_refusals_are_403(
    client: TestClient, alice, mallory
) -> None:
    hers = _complete(client, alice, APP)
    unknown = client.post("/v1/events", headers=mallory, json={"events": [_event("cmpl-nope")]})
    assert unknown.status_code == 404
    both = client.put(
        "/v1/ledger",
        headers=mallory,
        json={"entries": [_entry(hers, "x"), _entry("cmpl-nope", "y")]},
    )
    assert both.status_code == 403
    message = both.json()["error"]["message"]
    assert hers in message and "Unknown completions: cmpl-nope" in message
