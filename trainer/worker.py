"""The trainer's background worker: decides when a round is due, makes sure only one runs, and
finishes a round that was killed before it starts a new one.

A round is due when at least ``min_new_records`` new CI verdicts arrived since the last round's
cut-off (trigger ``records``), or ``interval_hours`` passed since the last round and at least
one verdict is new (trigger ``schedule``), unless ops paused training (``kaizen rollout set
--no-training``, or ``PUT /v1/rollout``). One round at a time: the worker holds the round lock
(:mod:`trainer.lock`: a file lock on SQLite, an advisory lock on PostgreSQL) while it works, so
a second worker, on this host or another, or a manual ``kaizen train``, gives up its turn. A round
left ``running`` in the database while nobody holds the lock was killed; the next tick resumes
it (see :mod:`trainer.round`).

With a retention window (``KAIZEN_RETENTION_DAYS``) every tick also deletes the records older
than it (:func:`server.store.governance.prune_records`), paused training or not: retention is
a promise to the users, not a training setting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from server.store import rounds as round_store
from server.store.governance import prune_records
from server.store.rollout import get_rollout_state
from trainer.lock import RoundBusyError, round_lock
from trainer.round import RoundReport

__all__ = ["RoundWorker", "Schedule", "due_trigger"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    min_new_records: int = 200
    interval_hours: float = 24.0


def due_trigger(session: Session, schedule: Schedule, now: datetime | None = None) -> str | None:
    """``"records"`` or ``"schedule"`` when a round is due, else None."""
    now = now or datetime.now(UTC)
    last = round_store.last_round(session=session)
    after = last.records_until if last is not None else None
    new = round_store.count_verdicts(session=session, after=after, until=now)
    if new >= schedule.min_new_records:
        return "records"
    if last is not None and new > 0:
        finished = last.finished_at or last.started_at
        if now - finished >= timedelta(hours=schedule.interval_hours):
            return "schedule"
    return None


class RoundWorker:
    """Runs rounds when due. ``run(trigger, resume_round_id)`` does the round, gate included
    (normally :func:`trainer.round.round_runner`'s, from the settings)."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        rounds_dir: Path,
        schedule: Schedule,
        run: Callable[[str, int | None], RoundReport],
        poll_seconds: float = 60.0,
        retention_days: float = 0.0,
    ) -> None:
        self.session_factory = session_factory
        self.rounds_dir = rounds_dir
        self.schedule = schedule
        self.run = run
        self.poll_seconds = poll_seconds
        self.retention_days = retention_days

    def prune(self) -> int:
        """Delete records older than the retention window (0: keep everything); how many rows
        went. Done under the round lock, so a running round never loses its input."""
        if self.retention_days <= 0:
            return 0
        with self.session_factory() as session:
            result = prune_records(session=session, retention_days=self.retention_days)
        if result.total:
            log.info(
                "event=records_pruned cutoff=%s completions=%d ci_runs=%d outcomes=%d",
                result.cutoff.isoformat(),
                result.completions,
                result.ci_runs,
                result.outcomes,
            )
        return result.total

    def tick(self) -> RoundReport | None:
        """Resume a killed round, or start a due one; None when there is nothing to do or
        another worker holds the lock."""
        try:
            with round_lock(self.rounds_dir, database=self.session_factory.kw.get("bind")):
                self.prune()
                with self.session_factory() as session:
                    if get_rollout_state(session=session).training_paused:
                        log.info("event=training_paused")  # `kaizen rollout set --training`
                        return None
                    unfinished = round_store.unfinished_rounds(session=session)
                    trigger = None if unfinished else due_trigger(session, self.schedule)
                if unfinished:
                    # We hold the lock, so nobody is running these: they were killed.
                    row = unfinished[0]
                    log.warning("event=round_resuming id=%d trigger=%s", row.id, row.trigger)
                    return self.run(row.trigger, row.id)
                if trigger is None:
                    return None
                log.info("event=round_due trigger=%s", trigger)
                return self.run(trigger, None)
        except RoundBusyError:
            log.info("event=round_busy dir=%s", self.rounds_dir)
            return None

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Tick every ``poll_seconds`` until ``stop`` is set; a failed round is logged and the
        worker carries on (the round's row holds the error)."""
        stop = stop or threading.Event()
        log.info(
            "event=trainer_worker_start min_new_records=%d interval_hours=%s poll_s=%s",
            self.schedule.min_new_records,
            self.schedule.interval_hours,
            self.poll_seconds,
        )
        while not stop.is_set():
            try:
                report = self.tick()
                if report is not None:
                    log.info("event=round_done id=%s status=%s", report.round_id, report.status)
            except Exception:
                log.exception("event=round_error")
            stop.wait(self.poll_seconds)
