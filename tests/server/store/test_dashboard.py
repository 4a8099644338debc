"""The dashboard's queries on hand-made rows: acceptance and CI pass rate per adapter version
and UTC day, and the rollout events of the audit trail."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from server.store.dashboard import daily_rates, rollout_events
from server.store.rollout import promote
from tests.utils.dashboard_rows import completion, event, outcome, registry_history

DAY1 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)


def _rates(session, since=DAY1 - timedelta(hours=9), until=DAY2 + timedelta(days=1)):  # type: ignore[no-untyped-def]
    return {(r.adapter, r.day): r for r in daily_rates(session=session, since=since, until=until)}


def test_acceptance_rate_per_version_and_day(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as s:
        for cid in ("a1", "a2", "a3"):
            completion(s, cid, adapter="v1", at=DAY1)
        event(s, "a1", "shown", DAY1)
        event(s, "a2", "shown", DAY1)
        event(s, "a2", "accepted", DAY1)  # shown and accepted: one completion, counted once
        completion(s, "a4", adapter="v1", at=DAY2)
        event(s, "a4", "partially_accepted", DAY2)
        completion(s, "b1", adapter=None, at=DAY1)
        event(s, "b1", "rejected", DAY1)
        rates = _rates(s)
    assert set(rates) == {("v1", DAY1.date()), ("v1", DAY2.date()), (None, DAY1.date())}
    day1 = rates[("v1", DAY1.date())]
    assert (day1.completions, day1.shown, day1.accepted) == (3, 2, 1)
    assert day1.acceptance_rate == 0.5
    assert rates[("v1", DAY2.date())].acceptance_rate == 1.0
    assert rates[(None, DAY1.date())].acceptance_rate == 0.0
    assert rates[(None, DAY1.date())].ci_pass_rate is None  # no verdict: no rate, not 0


def test_ci_pass_rate_counts_the_latest_run_and_leaves_developer_fixes_out(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as s:
        for cid in ("c1", "c2", "c3", "c4"):
            completion(s, cid, adapter="v1", at=DAY1, text="return a + b")
        outcome(s, "c1", "failed", at=DAY1 + timedelta(hours=1))
        outcome(s, "c1", "passed", at=DAY1 + timedelta(hours=2))  # the latest run wins
        outcome(s, "c2", "failed", at=DAY1 + timedelta(hours=1))
        outcome(s, "c2", "passed", at=DAY1 + timedelta(hours=3), final_text="return b + a")
        outcome(s, "c3", "failed", at=DAY1 + timedelta(hours=1))
        outcome(s, "c4", "passed", at=DAY2, final_text="  return a + b\n")  # same text, blanks
        rates = _rates(s)
    row = rates[("v1", DAY1.date())]  # bucketed by the completion's day, not the run's
    assert (row.judged, row.passed, row.developer_fixes) == (3, 2, 1)
    assert row.ci_pass_rate == 2 / 3


def test_days_are_utc_and_the_window_and_sources_hold(session_factory) -> None:  # type: ignore[no-untyped-def]
    late = datetime(2026, 11, 3, 23, 30, tzinfo=UTC)
    with session_factory() as s:
        completion(s, "late", adapter="v1", at=late)
        completion(s, "early", adapter="v1", at=late + timedelta(hours=1))  # the next UTC day
        completion(s, "explore", adapter="v1", at=late, source="resample")  # no user traffic
        completion(s, "before", adapter="v1", at=late - timedelta(days=5))
        for cid in ("late", "early", "explore", "before"):
            event(s, cid, "accepted", late)
        rates = _rates(s, since=late - timedelta(days=1), until=late + timedelta(days=1))
    assert {k: r.completions for k, r in rates.items()} == {
        ("v1", date(2026, 11, 3)): 1,
        ("v1", date(2026, 11, 4)): 1,
    }
    # Served in a zone east of UTC: still the UTC day.
    with session_factory() as s:
        completion(s, "zoned", adapter="v2", at=datetime.fromisoformat("2026-11-10T01:00+05:00"))
        got = daily_rates(session=s, since=late, until=late + timedelta(days=30))
    assert [(r.adapter, r.day) for r in got if r.adapter == "v2"] == [("v2", date(2026, 11, 9))]


def test_rollout_events_from_the_audit_trail(session_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry_history(session_factory, tmp_path)
    with session_factory() as s:
        promote(session=s, name="kaizen-r2", to="active", actor="ops:alice")
        now = datetime.now(UTC)
        events = rollout_events(session=s, since=now - timedelta(hours=1), until=now)
    assert [(e.kind, e.adapter) for e in events] == [
        ("canary_started", "kaizen-r0"),
        ("promoted", "kaizen-r0"),
        ("canary_started", "kaizen-r1"),
        ("rolled_back", "kaizen-r1"),
        ("canary_started", "kaizen-r2"),
        # kaizen-r0's retirement "replaced by kaizen-r2" is part of this promotion
        ("promoted", "kaizen-r2"),
    ]
    assert events[3].reason == "canary worse" and events[3].actor == "canary"
    with session_factory() as s:
        assert rollout_events(session=s, since=now + timedelta(seconds=1), until=now) == []
