"""A trainer worker process for the cross-host lock tests: the real :class:`RoundWorker` (its
tick takes the round lock exactly as ``kaizen train --watch`` does) on its own rounds directory
(no shared disk), with a round that only notes when it ran and sleeps.

    python -m tests.utils.lock_worker DATABASE_URL LOG ROUNDS_DIR --rounds N --hold SECONDS

Each line of LOG (opened for appending; lines are written whole) is
``<pid> start|end|busy <monotonic ns>``. A round is always due here (the schedule is not what
these tests are about)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import trainer.worker as worker_module
from server.store.db import make_engine, make_session_factory
from trainer.round import RoundReport
from trainer.worker import RoundWorker, Schedule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("database_url")
    parser.add_argument("log", type=Path)
    parser.add_argument("rounds_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=0.5)
    parser.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args()

    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(what: str) -> None:
        os.write(fd, f"{os.getpid()} {what} {time.monotonic_ns()}\n".encode())

    def run(trigger: str, resume_round_id: int | None) -> RoundReport:
        note("start")
        time.sleep(args.hold)
        note("end")
        return RoundReport(round_id=None, status="succeeded", funnel={})

    worker_module.due_trigger = lambda *a, **k: "records"  # type: ignore[assignment]
    db = make_engine(args.database_url)
    worker = RoundWorker(
        session_factory=make_session_factory(db),
        rounds_dir=args.rounds_dir,
        schedule=Schedule(),
        run=run,
        poll_seconds=0.05,
    )
    done, deadline = 0, time.monotonic() + args.deadline
    while done < args.rounds and time.monotonic() < deadline:
        if worker.tick() is None:
            note("busy")
            time.sleep(0.05)
        else:
            done += 1
            time.sleep(0.05)  # give the other worker its turn
    db.dispose()


if __name__ == "__main__":
    main()
