"""Executability in CI reports (POST /v1/outcomes, ``executability``): stored per text as the
plugin checked it in the project's environment, under the same scoping as verdicts, and never
as a verdict (real app, fake engine)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from server.store.models import CompletionExecutability, CompletionOutcome
from server.store.tokens import Role
from tests.server.api.test_feedback import _complete, _outcome
from tests.server.api.test_scoping import OTHER, _token
from tests.server.api.test_scoping import _complete as _complete_in


def _checked(cid: str, text: str, **result: object) -> dict[str, object]:
    values: dict[str, object] = {
        "parses": True,
        "imports": True,
        "api": False,
        "runs": None,
        "executable": False,
        "problems": ["os.path has no attribute 'joinn'"],
    }
    values.update(result)
    return {"completion_id": cid, "choice_index": 0, "final_text": text, **values}


def test_executability_is_stored_beside_the_verdicts(client: TestClient, auth) -> None:  # type: ignore[no-untyped-def]
    tested, untested = _complete(client, auth), _complete(client, auth)
    report = _outcome("run-x1", tested, "passed", "return a + b")
    report["executability"] = [_checked(untested, "os.path.joinn(a)"), _checked("cmpl-gone", "")]
    response = client.post("/v1/outcomes", headers=auth["ci"], json=report)
    assert response.status_code == 200, response.text
    assert response.json()["completions"] == 1
    assert response.json()["unknown_completion_ids"] == ["cmpl-gone"]
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        (row,) = session.scalars(select(CompletionExecutability)).all()
        outcomes = session.scalars(select(CompletionOutcome)).all()
    assert (row.completion_id, row.checked_in, row.api_ok, row.executable) == (
        untested,
        "ci",
        False,
        False,
    )
    assert row.problems == ["os.path has no attribute 'joinn'"]
    # A check is not a verdict: the untested completion has no outcome.
    assert [o.completion_id for o in outcomes] == [tested]


def test_a_malformed_check_is_400(client: TestClient, auth) -> None:  # type: ignore[no-untyped-def]
    cid = _complete(client, auth)
    report = _outcome("run-x2", cid, "passed", "return a + b")
    report["executability"] = [{"completion_id": cid, "final_text": "x"}]  # no result
    assert client.post("/v1/outcomes", headers=auth["ci"], json=report).status_code == 400


def test_a_scoped_token_checks_only_its_repositories(client: TestClient, auth) -> None:  # type: ignore[no-untyped-def]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    ci = _token(factory, "app-ci", Role.CI, ["github.com/acme/app"])
    ours = _complete(client, auth)
    theirs = _complete_in(client, auth["ide"], OTHER)
    report = _outcome("run-x3", ours, "passed", "return a + b")
    report["executability"] = [_checked(ours, "a"), _checked(theirs, "b")]
    response = client.post("/v1/outcomes", headers=ci, json=report)
    assert response.status_code == 200, response.text
    assert response.json()["refused"] == [
        {"completion_id": theirs, "choice_index": 0, "reason": "repository_not_in_scope"}
    ]
    with factory() as session:
        rows = session.scalars(select(CompletionExecutability)).all()
    assert [r.completion_id for r in rows] == [ours]
