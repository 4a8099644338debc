"""The registry and rollout through the ops API, with the scripted engine (its replies name the
adapter that served them): promote, canary share, rollback, pin, refusals that leave serving
untouched, automatic canary decisions, unloading, and the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from server.app import create_app
from server.config import Settings
from server.services.routing import in_canary
from server.store import registry
from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.feedback import save_events, save_outcome
from tests.utils.adapters import BASE_SHA, approved_adapter, make_adapter_dir
from tests.utils.fake_engine import FakeEngine


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(base_sha256=BASE_SHA)


def served_by(client: TestClient, headers: dict[str, str]) -> str:
    """Which version served a request for the base model's name (the fake says in its text)."""
    response = client.post(
        "/v1/completions",
        headers=headers,
        json={"model": "fake-model", "prompt": "x = ", "max_tokens": 40, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    served = response.json()["choices"][0]["text"].split("# ", 1)[1].split("\n", 1)[0]
    assert response.headers["X-Kaizen-Adapter"] == served
    return served


def promote(client: TestClient, auth: dict[str, dict[str, str]], name: str, to: str) -> Any:
    return client.post(f"/v1/adapters/{name}/promote", headers=auth["ops"], json={"to": to})


def test_promote_canary_active_and_rollback(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    for name in ("a1", "a2", "a3"):
        approved_adapter(session_factory, tmp_path, name)
    assert served_by(client, auth["ide"]) == "base"

    response = promote(client, auth, "a1", "active")
    assert response.status_code == 200, response.text
    assert response.json()["changes"] == ["a1 is active"]
    assert response.json()["rollout"]["replica"]["active"] == "a1"
    assert served_by(client, auth["ide"]) == "a1"

    assert promote(client, auth, "a2", "canary").status_code == 200
    share = client.put("/v1/rollout", headers=auth["ops"], json={"canary_share": 1.0})
    assert share.status_code == 200 and share.json()["rollout"]["canary_share"] == 1.0
    assert served_by(client, auth["ide"]) == "a2"
    client.put("/v1/rollout", headers=auth["ops"], json={"canary_share": 0.0})
    assert served_by(client, auth["ide"]) == "a1"
    client.put("/v1/rollout", headers=auth["ops"], json={"canary_share": 1.0})

    back = client.post("/v1/rollout/rollback", headers=auth["ops"], json={"reason": "bad"})
    assert back.status_code == 200
    assert back.json()["changes"] == ["retired canary a2"]
    assert served_by(client, auth["ide"]) == "a1"

    assert promote(client, auth, "a3", "active").json()["changes"] == [
        "retired a1",
        "a3 is active",
    ]
    assert served_by(client, auth["ide"]) == "a3"
    back = client.post("/v1/rollout/rollback", headers=auth["ops"], json={})
    assert back.json()["changes"] == ["retired a3", "a1 is active again"]
    assert served_by(client, auth["ide"]) == "a1"

    detail = client.get("/v1/adapters/a1", headers=auth["ops"]).json()
    assert [(h["from_state"], h["to_state"]) for h in detail["history"]] == [
        (None, "candidate"),
        ("candidate", "evaluating"),
        ("evaluating", "approved"),
        ("approved", "active"),
        ("active", "retired"),
        ("retired", "active"),
    ]
    assert detail["history"][-1]["actor"] == "ops:test-ops"
    assert "restored by rollback of a3" in detail["history"][-1]["reason"]
    listing = client.get("/v1/adapters", headers=auth["ops"]).json()
    states = {a["name"]: a["state"] for a in listing["data"]}
    assert states == {"a1": "active", "a2": "retired", "a3": "retired"}
    a1 = next(a for a in listing["data"] if a["name"] == "a1")
    assert a1["online"]["completions"] >= 3 and a1["loaded_here"]

    # Rolling back again goes further back (to the base model), never to a3 again.
    again = client.post("/v1/rollout/rollback", headers=auth["ops"], json={})
    assert again.json()["changes"] == ["retired a1", "the base model serves"]
    assert served_by(client, auth["ide"]) == "base"
    nothing = client.post("/v1/rollout/rollback", headers=auth["ops"], json={})
    assert nothing.status_code == 409


def test_refused_adapters_leave_serving_untouched(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    approved_adapter(session_factory, tmp_path, "good")
    assert promote(client, auth, "good", "active").status_code == 200
    approved_adapter(session_factory, tmp_path, "too-big", rank=32)
    approved_adapter(session_factory, tmp_path, "other-base", base_sha256="c" * 64)
    approved_adapter(session_factory, tmp_path, "corrupt")
    weights = tmp_path / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated

    for name, why in (
        ("too-big", "rank 32"),
        ("other-base", "another base model"),
        ("corrupt", "shorter than its header says"),
    ):
        for to in ("active", "canary"):
            response = promote(client, auth, name, to)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "adapter_refused"
            assert why in response.json()["error"]["message"]
        assert served_by(client, auth["ide"]) == "good"
    with session_factory() as session:
        states = {a.name: a.state for a in registry.list_adapters(session=session)}
    assert states == {
        "good": "active",
        "too-big": "approved",
        "other-base": "approved",
        "corrupt": "approved",
    }
    pin = client.put("/v1/rollout", headers=auth["ops"], json={"pinned": "corrupt"})
    assert pin.status_code == 422
    assert served_by(client, auth["ide"]) == "good"


def test_wrong_moves_are_refused_with_what_to_do(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    path = make_adapter_dir(tmp_path / "fresh")
    with session_factory() as session:
        registry.register_adapter(
            session=session,
            name="fresh",
            path=str(path),
            base_sha256=BASE_SHA,
            manifest={},
            parent_id=None,
            round_id=None,
            actor="test",
        )
    response = promote(client, auth, "fresh", "active")
    assert response.status_code == 409
    assert "it cannot become active" in response.json()["error"]["message"]
    assert promote(client, auth, "nope", "active").status_code == 404
    bad = client.post("/v1/adapters/fresh/promote", headers=auth["ops"], json={"to": "gone"})
    assert bad.status_code == 400
    nothing = client.post("/v1/rollout/rollback", headers=auth["ops"], json={})
    assert nothing.status_code == 409 and "nothing to roll back" in nothing.text
    assert promote(client, {"ops": auth["ide"]}, "fresh", "active").status_code == 403
    assert client.get("/v1/rollout", headers=auth["ci"]).status_code == 403


def test_pin_serves_one_version_to_everybody(
    client: TestClient,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    for name in ("a1", "a2", "old"):
        approved_adapter(session_factory, tmp_path, name)
    promote(client, auth, "a1", "active")
    promote(client, auth, "a2", "canary")
    client.put("/v1/rollout", headers=auth["ops"], json={"canary_share": 1.0})
    assert served_by(client, auth["ide"]) == "a2"
    pinned = client.put("/v1/rollout", headers=auth["ops"], json={"pinned": "old"})
    assert pinned.status_code == 200 and pinned.json()["rollout"]["pinned"] == "old"
    assert served_by(client, auth["ide"]) == "old"
    client.put("/v1/rollout", headers=auth["ops"], json={"pinned": None})
    assert served_by(client, auth["ide"]) == "a2"


def test_canary_share_is_sticky_per_token() -> None:
    picks = [in_canary(token_id, 0.3) for token_id in range(2000)]
    assert 0.26 < sum(picks) / len(picks) < 0.34
    assert picks == [in_canary(token_id, 0.3) for token_id in range(2000)]
    assert not any(in_canary(t, 0.0) for t in range(100))
    assert all(in_canary(t, 1.0) for t in range(100))
    # Raising the share only adds tokens to the canary: nobody flips back and forth.
    assert all(in_canary(t, 0.5) for t in range(2000) if in_canary(t, 0.3))


def _traffic(
    factory: sessionmaker[Session],
    adapter: str,
    n: int,
    *,
    accepted: int,
    passed: int,
    start: int = 0,
    fixed: int = 0,
    created_at: datetime | None = None,
) -> None:
    """Completions ``start``.. ``start+n-1`` by ``adapter``, all shown; those numbered below
    ``accepted`` are accepted and those below ``passed`` pass CI (the rest fail); of the passed
    ones, those below ``fixed`` pass with a final text the developer changed."""
    now = created_at or datetime.now(UTC)
    with factory() as session:
        for i in range(start, start + n):
            cid = f"cmpl-{adapter}-{i}"
            save_completions(
                session=session,
                records=[
                    CompletionRecord(
                        id=cid,
                        created_at=now,
                        token_id=None,
                        endpoint="completions",
                        model="fake-model",
                        adapter=adapter,
                        prompt="p",
                        params={},
                        stream=False,
                        choices=[ChoiceRecord(index=0, text="t")],
                    )
                ],
            )
            events = [
                {
                    "id": f"ev-shown-{cid}",
                    "completion_id": cid,
                    "choice_index": 0,
                    "type": "shown",
                    "timestamp": now,
                }
            ]
            if i < accepted:
                events.append(
                    {
                        "id": f"ev-acc-{cid}",
                        "completion_id": cid,
                        "choice_index": 0,
                        "type": "accepted",
                        "timestamp": now,
                    }
                )
            save_events(session=session, events=events, token_id=None)
            status = "passed" if i < passed else "failed"
            save_outcome(
                session=session,
                run={
                    "run_id": f"ci-{cid}",
                    "repository": "r",
                    "commit": "c",
                    "status": status,
                    "tests": [],
                },
                completions=[
                    {
                        "completion_id": cid,
                        "choice_index": 0,
                        "file_path": "f",
                        "final_text": "t  # fixed by hand" if i < fixed else "t",
                        "status": status,
                        "tests": [],
                    }
                ],
                raw={},
                token_id=None,
            )


@pytest.mark.parametrize(
    ("canary_passed", "expected", "verdict"),
    [
        (57, ["retired active", "canary is active"], "promote"),
        (24, ["retired canary canary"], "rollback"),
    ],
)
def test_the_canary_is_judged_by_its_sequential_test(
    settings: Settings,
    fake_engine: FakeEngine,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    canary_passed: int,
    expected: list[str],
    verdict: str,
) -> None:
    # The app's own poll (every 2 s by default) would race the test's calls: poll hourly.
    settings = settings.model_copy(
        update={"rollout_min_samples": 10, "canary_min_hours": 0.0, "rollout_poll_seconds": 3600}
    )
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        approved_adapter(session_factory, tmp_path, "active")
        approved_adapter(session_factory, tmp_path, "canary")
        promote(client, auth, "active", "active")
        promote(client, auth, "canary", "canary")
        rollout = client.app.state.adapter_sync  # type: ignore[attr-defined]
        _traffic(session_factory, "active", 200, accepted=160, passed=160)  # 0.8 and 0.8
        _traffic(session_factory, "canary", 9, accepted=9, passed=9)
        assert rollout.judge_canary() == []  # 9 < 10 samples on the canary's side
        _traffic(session_factory, "canary", 51, accepted=57, passed=canary_passed, start=9)
        client.put("/v1/rollout", headers=auth["ops"], json={"auto_rollout": False})
        assert rollout.judge_canary() == []  # paused
        client.put("/v1/rollout", headers=auth["ops"], json={"auto_rollout": True})
        assert rollout.judge_canary() == expected
        assert rollout.judge_canary() == []  # decided once
        detail = client.get("/v1/adapters/canary", headers=auth["ops"]).json()
        last = detail["history"][-1]
        assert last["actor"] == "canary"
        assert "ci_pass" in last["reason"] and "llr" in last["reason"]
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="canary")
        assert adapter is not None and adapter.evaluation is not None
        evidence = adapter.evaluation["canary"]
    # The evidence is stored with the move (one transaction), beside the gate's verdict.
    assert evidence["decision"] == verdict and evidence["against"] == "active"
    assert evidence["counts"]["canary"]["shown"] == 60
    assert evidence["counts"]["canary"]["passed"] == canary_passed
    assert evidence["counts"]["active"]["judged"] == 200
    assert evidence["evidence"]["ci_pass"]["verdict"] == (
        "no worse" if verdict == "promote" else "worse"
    )


def test_developer_fixes_and_completions_before_the_canary_do_not_count(
    session_factory: sessionmaker[Session],
) -> None:
    from datetime import timedelta

    from server.store.canary import canary_counts

    started = datetime.now(UTC)
    # Served the day before the canary started: not the canary's evidence.
    before = started - timedelta(days=1)
    _traffic(session_factory, "v2", 5, accepted=105, passed=105, start=100, created_at=before)
    # 0..9: accepted 0..3, passed 0..7 of which 0..2 only after the developer's fix.
    _traffic(session_factory, "v2", 10, accepted=4, passed=8, fixed=3)
    _traffic(session_factory, "v1", 10, accepted=2, passed=2)
    with session_factory() as session:
        counts = canary_counts(
            session=session,
            adapters=["v2", "v1", None],
            since=started,
            until=datetime.now(UTC) + timedelta(seconds=1),
        )
    v2 = counts["v2"]
    assert (v2.shown, v2.accepted, v2.judged, v2.passed, v2.developer_fixes) == (10, 4, 7, 5, 3)
    v1 = counts["v1"]
    assert (v1.shown, v1.accepted, v1.judged, v1.passed, v1.developer_fixes) == (10, 2, 10, 2, 0)
    assert counts[None].shown == 0


def test_a_version_that_left_routing_is_unloaded_once_idle(
    settings: Settings,
    fake_engine: FakeEngine,
    auth: dict[str, dict[str, str]],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    settings = settings.model_copy(update={"rollout_unload_grace_seconds": 0})
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        approved_adapter(session_factory, tmp_path, "v1")
        approved_adapter(session_factory, tmp_path, "v2")
        promote(client, auth, "v1", "active")
        adapter_sync = client.app.state.adapter_sync  # type: ignore[attr-defined]
        adapter_sync.router.acquire("v1")  # a request still streaming from v1
        promote(client, auth, "v2", "active")
        assert "v1" in {a.name for a in fake_engine.adapters()}
        adapter_sync.router.release("v1")
        client.portal.call(adapter_sync.sync)
        assert fake_engine.removed == ["v1"]
        assert "test-adapter" in {a.name for a in fake_engine.adapters()}  # static: kept
        assert served_by(client, auth["ide"]) == "v2"
