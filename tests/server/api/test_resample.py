"""``POST /v1/resample``: alternatives sampled from a served completion's recorded context,
recorded as completions of their own (source ``resample``, ``parent_id``), for ci tokens that
cover the served repository only (real app, fake engine)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.store.tokens import Role, create_token
from tests.utils.fake_engine import FakeEngine
from tests.utils.records import fetch

APP = "github.com/acme/app"


def _token(session_factory, role: Role, repositories=None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        _, secret = create_token(
            session=session, name=f"{role.value}-x", role=role, repositories=repositories
        )
    return {"Authorization": f"Bearer {secret}"}


def _serve(client: TestClient, auth: dict[str, dict[str, str]], **extra: object) -> str:
    body = {
        "model": "fake-model",
        "prompt": "def add(a, b):\n    return ",
        "suffix": "\n\nprint(add(1, 2))\n",
        "max_tokens": 20,
        "temperature": 0,
        "stop": ["#"],
        "single_line": True,
        "context": {"language": "python", "file_path": "src/calc.py", "repository": APP},
        **extra,
    }
    r = client.post("/v1/completions", headers=auth["ide"], json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_alternatives_repeat_the_recorded_request_and_are_recorded_with_their_parent(
    client: TestClient, auth: dict[str, dict[str, str]], fake_engine: FakeEngine
) -> None:
    seen: list[str] = []

    def reply(prompt: str, adapter: str | None, index: int) -> str:
        seen.append(prompt)
        return f"a + {index}\nmore"

    parent = _serve(client, auth)
    fake_engine.reply = reply
    r = client.post("/v1/resample", headers=auth["ci"], json={"completion_id": parent, "n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parent_id"] == parent and body["adapter"] is None
    # single_line was recorded, so each alternative stops at its line's end, as served.
    assert [a["text"] for a in body["alternatives"]] == ["a + 0", "a + 1", "a + 2"]
    assert body["remaining"] == 32 - 3
    # The model saw the same FIM prompt as when the completion was served.
    assert seen and all(p == seen[0] for p in seen) and "<|fim_suffix|>" in seen[0]

    served, child = fetch(client, parent), fetch(client, body["id"])
    assert served is not None and child is not None
    assert child.source == "resample" and child.parent_id == parent
    assert served.source == "serve" and served.parent_id is None
    assert (child.prompt, child.suffix) == (served.prompt, served.suffix)
    assert child.repository == APP and child.file_path == "src/calc.py"
    assert child.params["stop"] == served.params["stop"]  # no stop doubled
    assert child.params["single_line"] is True and child.params["max_tokens"] == 20
    assert child.params["temperature"] == 0.8 and child.params["n"] == 3
    assert [c.text for c in child.choices] == ["a + 0", "a + 1", "a + 2"]


def test_scope_roles_and_bounds(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory,  # type: ignore[no-untyped-def]
) -> None:
    parent = _serve(client, auth)
    other = _token(session_factory, Role.CI, repositories=["github.com/acme/other"])
    mine = _token(session_factory, Role.CI, repositories=[APP])
    ask = {"completion_id": parent, "n": 2}

    r = client.post("/v1/resample", headers=other, json=ask)
    assert r.status_code == 403 and r.json()["error"]["code"] == "repository_not_in_scope"
    assert client.post("/v1/resample", headers=auth["ide"], json=ask).status_code == 403
    assert client.post("/v1/resample", headers=mine, json=ask).status_code == 200
    assert client.post("/v1/resample", headers=auth["ops"], json=ask).status_code == 200

    r = client.post("/v1/resample", headers=mine, json={"completion_id": "cmpl-nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_completion"
    r = client.post("/v1/resample", headers=mine, json={"completion_id": parent, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"

    # An alternative is not explored in turn.
    child = client.post("/v1/resample", headers=mine, json=ask).json()["id"]
    r = client.post("/v1/resample", headers=mine, json={"completion_id": child})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_explorable"

    # At most 32 alternatives per served completion, over all calls: 6 so far.
    for _ in range(3):
        r = client.post("/v1/resample", headers=mine, json={"completion_id": parent, "n": 8})
        assert r.status_code == 200
    assert r.json()["remaining"] == 2
    r = client.post("/v1/resample", headers=mine, json={"completion_id": parent, "n": 8})
    assert r.status_code == 200 and len(r.json()["alternatives"]) == 2
    r = client.post("/v1/resample", headers=mine, json={"completion_id": parent, "n": 1})
    assert r.status_code == 429 and r.json()["error"]["code"] == "alternatives_exhausted"


def test_a_completion_served_without_repository_is_explored_by_unscoped_tokens_only(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory,  # type: ignore[no-untyped-def]
) -> None:
    parent = _serve(client, auth, context={"file_path": "x.py"})
    scoped = _token(session_factory, Role.CI, repositories=[APP])
    ask = {"completion_id": parent, "n": 1}
    assert client.post("/v1/resample", headers=scoped, json=ask).status_code == 403
    assert client.post("/v1/resample", headers=auth["ci"], json=ask).status_code == 200


def test_alternatives_are_no_traffic_for_stats_or_the_canary(
    client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    from datetime import UTC, datetime, timedelta

    from server.store.canary import canary_counts

    parent = _serve(client, auth)
    child = client.post(
        "/v1/resample", headers=auth["ci"], json={"completion_id": parent, "n": 2}
    ).json()["id"]
    report = {
        "run_id": "r:explore",
        "repository": APP,
        "commit": "c1",
        "status": "passed",
        "completions": [
            {"completion_id": child, "choice_index": i, "file_path": "src/calc.py",
             "final_text": "a + 1", "status": "passed", "tests": ["t.py::t"]}
            for i in range(2)
        ],
    }  # fmt: skip
    assert client.post("/v1/outcomes", headers=auth["ci"], json=report).status_code == 200
    stats = client.get("/v1/stats", headers=auth["ops"]).json()["data"]
    assert [(s["completions"], s["with_outcome"]) for s in stats] == [(1, 0)]
    now = datetime.now(UTC)
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        counts = canary_counts(
            session=session, adapters=[None], since=now - timedelta(hours=1), until=now
        )
    # The alternatives' passing verdicts (on the model's own text) would count as judged.
    assert (counts[None].judged, counts[None].passed) == (0, 0)
    assert fetch(client, child) is not None  # recorded, just not counted
