"""The replica's metrics (server/services/metrics.py): route labels, the routing table and the
loop's counts read at scrape time, and a scrape that still answers when the database is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from server.services.metrics import Metrics, route_label
from server.services.routing import Router, Routing
from server.store import registry
from server.store import rounds as round_store
from server.store.completions import ChoiceRecord, CompletionRecord
from server.store.db import make_engine, make_session_factory

ROUTING = Routing(active="v1", canary="v2", pinned=None, canary_share=0.25)


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_route_labels() -> None:
    assert route_label(ROUTING, None) == "base"
    assert route_label(ROUTING, "v1") == "active"
    assert route_label(ROUTING, "v2") == "canary"
    assert route_label(Routing(active="v1", pinned="v1"), "v1") == "pinned"  # pinned wins
    assert route_label(ROUTING, "by-name") == "named"
    assert route_label(None, "by-name") == "named"


def test_a_completion_is_counted_under_its_version_and_route() -> None:
    metrics = Metrics(model="m")
    record = CompletionRecord(
        id="cmpl-1",
        created_at=datetime.now(UTC),
        token_id=None,
        endpoint="completions",
        model="m",
        adapter="v2",
        prompt="x",
        suffix=None,
        params={},
        stream=True,
        prompt_tokens=7,
        choices=[ChoiceRecord(index=0, text="ab", tokens=3), ChoiceRecord(index=1, tokens=2)],
    )
    record.status, record.ttft_ms, record.latency_ms = "completed", 150.0, 900.0
    metrics.observe_completion(record, "canary")
    found = _samples(metrics)
    labels = {"adapter": "v2", "model": "m", "route": "canary"}
    assert found["kaizen_completions_total"] == [({**labels, "status": "completed"}, 1.0)]
    assert found["kaizen_prompt_tokens_total"] == [(labels, 7.0)]
    assert found["kaizen_generated_tokens_total"] == [(labels, 5.0)]
    assert (labels, 0.9) in found["kaizen_completion_latency_seconds_sum"]
    ttft_le = {lab["le"]: v for lab, v in found["kaizen_time_to_first_token_seconds_bucket"]}
    assert ttft_le["0.1"] == 0 and ttft_le["0.25"] == 1


def test_the_routing_table_is_read_at_scrape_time() -> None:
    router = Router(routing=ROUTING, synced=True)
    router.acquire("v2")
    metrics = Metrics(model="m", router=router)
    found = _samples(metrics)
    assert sorted((lab["adapter"], lab["route"]) for lab, _ in found["kaizen_route_info"]) == [
        ("v1", "active"),
        ("v2", "canary"),
    ]
    assert found["kaizen_canary_share"] == [({"adapter": "v2", "model": "m"}, 0.25)]
    assert found["kaizen_requests_in_flight"] == [({"adapter": "v2", "model": "m"}, 1.0)]
    router.routing = Routing(active="v2")  # promoted: the next scrape shows it
    router.release("v2")
    found = _samples(metrics)
    assert [(lab["adapter"], lab["route"]) for lab, _ in found["kaizen_route_info"]] == [
        ("v2", "active")
    ]
    assert found["kaizen_canary_share"] == [({"adapter": "", "model": "m"}, 0.0)]
    assert "kaizen_requests_in_flight" not in found


def test_the_loop_is_counted_from_the_database(
    session_factory: sessionmaker[Session],
) -> None:
    now = datetime.now(UTC)
    with session_factory() as session:
        for status, minutes in (("succeeded", 10), ("succeeded", 20), ("skipped", 1)):
            row = round_store.start_round(
                session=session,
                trigger="manual",
                records_until=now,
                parent_adapter_id=None,
                work_dir="",
                config={},
            )
            row.started_at = now - timedelta(minutes=minutes)
            session.commit()
            round_store.update_round(session=session, round_id=row.id, status=status)
        round_store.start_round(session=session, trigger="records", records_until=now,
                                parent_adapter_id=None, work_dir="", config={})  # fmt: skip
        moves = {"good": ["evaluating", "approved", "canary"], "bad": ["evaluating", "rejected"]}
        for name, path in moves.items():
            adapter = registry.register_adapter(session=session, name=name, path="/x",
                                                base_sha256="0", manifest={}, parent_id=None,
                                                round_id=None, actor="trainer")  # fmt: skip
            for state in path:
                registry.transition(session=session, adapter=adapter, to_state=state, actor="gate")
    found = _samples(Metrics(model="m", session_factory=session_factory))
    assert found["kaizen_loop_database_up"] == [({}, 1.0)]
    rounds = {lab["status"]: v for lab, v in found["kaizen_training_rounds_total"]}
    assert rounds == {"running": 1, "skipped": 1, "succeeded": 2}
    count = {lab["status"]: v for lab, v in found["kaizen_training_round_duration_seconds_count"]}
    seconds = {lab["status"]: v for lab, v in found["kaizen_training_round_duration_seconds_sum"]}
    assert count == {"skipped": 1, "succeeded": 2}  # a running round has no duration yet
    assert abs(seconds["succeeded"] - 1800) < 60
    gate = {lab["decision"]: v for lab, v in found["kaizen_gate_decisions_total"]}
    assert gate == {"approved": 1, "rejected": 1}
    states = [(lab["adapter"], lab["state"]) for lab, _ in found["kaizen_adapter_state_info"]]
    assert states == [("good", "canary")]  # rejected versions are not live


def test_a_scrape_answers_when_the_database_is_down(tmp_path: Path) -> None:
    gone = make_engine(f"sqlite:///{tmp_path / 'missing' / 'kaizen.db'}")  # cannot be opened
    metrics = Metrics(model="m", session_factory=make_session_factory(gone))
    found = _samples(metrics)
    assert found["kaizen_loop_database_up"] == [({}, 0.0)]
    assert "kaizen_training_rounds_total" not in found
    gone.dispose()
