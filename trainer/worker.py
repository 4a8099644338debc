"""The trainer's background worker: decides when a round is due, makes sure only one runs, and
finishes a round that was killed before it starts a new one.

A round is due when at least ``min_new_records`` new CI verdicts arrived since the last round's
cut-off (trigger ``records``), or ``interval_hours`` passed since the last round and at least
one verdict is new (trigger ``schedule``), unless ops paused training (``kaizen rollout set
--no-training``, or ``PUT /v1/rollout``). One round at a time: the worker holds an exclusive
file lock (``rounds_dir/.lock``) while it works, so a second worker on the same host, or a
manual ``kaizen train``, waits its turn or gives up; on PostgreSQL the lock is an advisory
lock in the database instead, so workers on different hosts take turns the same way. A round
left ``running`` in the database while nobody holds the lock was killed; the next tick resumes
it (see :mod:`trainer.round`).

With a retention window (``KAIZEN_RETENTION_DAYS``) every tick also deletes the records older
than it (:func:`server.store.governance.prune_records`), paused training or not: retention is
a promise to the users, not a training setting.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.store import rounds as round_store
from server.store.governance import prune_records
from server.store.locks import LockBusyError, advisory_lock, supports_advisory_locks
from server.store.rollout import get_rollout_state
from trainer.config import TrainConfig
from trainer.round import RoundOptions, RoundReport

__all__ = [
    "RoundBusyError",
    "RoundWorker",
    "Schedule",
    "due_trigger",
    "round_lock",
    "round_runner",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ROUND_LOCK_NAME = "kaizen.training_round"


class RoundBusyError(RuntimeError):
    """Another round holds the lock."""


@contextmanager
def round_lock(
    rounds_dir: Path, *, wait: bool = False, database: Engine | str | None = None
) -> Iterator[None]:
    """Hold the one-round-at-a-time lock; raises :class:`RoundBusyError` when it is taken and
    ``wait`` is false. The kernel drops the lock when the process dies, however it dies.

    With ``database`` on PostgreSQL the lock is an advisory lock there
    (:mod:`server.store.locks`), so workers on different hosts take turns too; the database
    drops it when the holder's session ends. SQLite keeps the file lock."""
    if database is not None and supports_advisory_locks(database):
        with ExitStack() as stack:
            try:
                stack.enter_context(advisory_lock(database, ROUND_LOCK_NAME, wait=wait))
            except LockBusyError as exc:
                raise RoundBusyError(
                    "another training round is running (the database lock "
                    f"{ROUND_LOCK_NAME!r} is held)"
                ) from exc
            yield
        return
    rounds_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(rounds_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise RoundBusyError(
                f"another training round is running (lock {rounds_dir / LOCK_FILE} is held)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


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
    """Runs rounds when due. ``run(trigger, resume_round_id)`` does the round (normally a
    closure over :func:`trainer.round.run_round` with the settings' model and config)."""

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


def vllm_generator_factory(settings: Settings, model_dir: Path) -> Callable[[], Any]:
    """Builds the trainer's vLLM engine with the server's limits (context, LoRA rank, KV cache),
    for resampling and the gate; each call starts a fresh one (close it when done)."""

    def make() -> Any:
        from trainer.generate import VllmGenerator

        return VllmGenerator(
            model_dir,
            max_model_len=settings.max_model_len,
            max_lora_rank=settings.max_lora_rank,
            kv_cache_gib=settings.kv_cache_gib,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
        )

    return make


def round_runner(
    settings: Settings,
    *,
    config: TrainConfig | None = None,
    options: RoundOptions | None = None,
    parent: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> Callable[[str, int | None], RoundReport]:
    """A round as the settings describe it: the served model, its engine limits for
    resampling, ``rounds_dir`` for the work. What ``kaizen train`` and the worker run."""
    from server.engine.vllm_engine import resolve_model_dir
    from server.store.artifacts import restore_round_parents
    from server.store.db import make_engine, make_session_factory
    from trainer.round import run_round

    assert settings.rounds_dir is not None
    rounds_dir = settings.rounds_dir
    base_model_dir = resolve_model_dir(settings)
    # One token budget for everything: what the server can serve (KAIZEN_MAX_MODEL_LEN) is
    # what selection scores and training trains (see trainer.budget).
    config = config or TrainConfig(
        max_steps=settings.train_max_steps, max_length=settings.max_model_len
    )
    options = options or RoundOptions(
        n_resample=settings.train_resample,
        max_token_share=settings.train_max_token_share,
        max_fix_distance=settings.train_max_fix_distance,
    )

    generator = vllm_generator_factory(settings, base_model_dir)

    def run(trigger: str, resume_round_id: int | None) -> RoundReport:
        db = make_engine(settings.database_url)
        try:
            with make_session_factory(db)() as session:  # trained on another trainer host?
                restore_round_parents(
                    session,
                    root=rounds_dir,
                    parent=parent,
                    endpoint_url=settings.adapter_store_endpoint_url or None,
                )
            report = run_round(
                session_factory=make_session_factory(db),
                base_model_dir=base_model_dir,
                rounds_dir=rounds_dir,
                config=config,
                options=options,
                generator_factory=generator,
                parent=parent,
                trigger=trigger,
                dry_run=dry_run,
                resume_round_id=resume_round_id,
                progress=progress,
            )
            if report.status == "succeeded" and report.adapter_name and settings.train_auto_gate:
                factory = make_session_factory(db)
                report.gate = gate_and_canary(
                    settings, factory, report.adapter_name, generator, progress=progress
                )
            return report
        finally:
            db.dispose()

    return run


def gate_config(settings: Settings) -> Any:
    """The gate as the settings describe it (MBPP+ ships with Kaizen: every suite runs)."""
    from trainer.gate import GateConfig

    return GateConfig.from_settings(settings)


def gate_and_canary(
    settings: Settings,
    session_factory: sessionmaker[Session],
    adapter_name: str,
    generator: Callable[[], Any],
    *,
    canary: bool = True,
    progress: bool = True,
    suites: Any = None,
) -> dict[str, Any]:
    """Gate a candidate; an approved one becomes the canary when ``canary`` and automatic
    rollout is on (not paused, nothing pinned). Returns the decision, reasons and changes.
    ``suites`` (name -> tasks) replaces the configured suites (tests use toy ones)."""
    from server.store.rollout import RolloutError, promote
    from trainer.gate import run_gate
    from trainer.sandbox import Sandbox

    engine = generator()
    try:
        result = run_gate(
            session_factory=session_factory,
            adapter_name=adapter_name,
            generator=engine,
            sandbox=Sandbox(workers=2),
            mbpp_path=settings.mbpp_path,
            config=gate_config(settings),
            progress=progress,
            suites=suites,
        )
    finally:
        engine.close()
    out: dict[str, Any] = {"decision": result.decision, "reasons": result.reasons, "changes": []}
    if result.approved and canary:
        with session_factory() as session:
            state = get_rollout_state(session=session)
            if state.auto_rollout and state.pinned_adapter_id is None:
                try:
                    out["changes"] = promote(
                        session=session,
                        name=adapter_name,
                        to="canary",
                        actor="trainer",
                        reason="approved by the gate",
                    )
                except RolloutError as exc:
                    out["changes"] = [f"not made the canary: {exc}"]
            else:
                out["changes"] = [
                    "automatic rollout is paused or a version is pinned: promote it by hand"
                ]
    log.info(
        "event=gate_done adapter=%s decision=%s changes=%r",
        adapter_name,
        result.decision,
        out["changes"],
    )
    return out
