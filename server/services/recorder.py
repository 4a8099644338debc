"""Writes completion records off the request path: a queue drained in batches by one task.

A request only enqueues its record; a background task writes batches in a worker thread (so
SQLite never blocks the event loop). ``stop()`` drains the queue, so a graceful shutdown loses no
record of a response already sent. A write that fails because the database is unreachable is
retried; a record the database refuses is logged in full rather than dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.store.completions import CompletionRecord, save_completions

log = logging.getLogger(__name__)


class Recorder:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        batch_size: int = 64,
        retry_delay: float = 1.0,
    ) -> None:
        self._session_factory = session_factory
        self._batch_size = batch_size
        self._retry_delay = retry_delay
        self._queue: asyncio.Queue[CompletionRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kaizen-recorder")

    def submit(self, record: CompletionRecord) -> None:
        """Queue a record; never blocks and never raises into the request."""
        self._queue.put_nowait(record)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until every record queued so far is written (tests, shutdown)."""
        await self._queue.join()

    async def stop(self) -> None:
        """Write everything still queued, then stop the writer."""
        self._closing = True
        if self._task is None:
            return
        await self.flush()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        log.info("event=recorder_stopped written=%d", self.written)

    def _write(self, batch: list[CompletionRecord]) -> None:
        with self._session_factory() as session:
            save_completions(session=session, records=batch)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write_with_retry(batch)
            for _ in batch:
                self._queue.task_done()

    async def _write_with_retry(self, batch: list[CompletionRecord]) -> None:
        while True:
            try:
                await asyncio.to_thread(self._write, batch)
                self.written += len(batch)
                return
            except OperationalError:
                # The database is unreachable or locked: keep the records and try again.
                log.exception(
                    "event=record_write_failed count=%d retry_in_s=%.1f",
                    len(batch),
                    self._retry_delay,
                )
                await asyncio.sleep(self._retry_delay)
            except Exception:
                if len(batch) == 1:
                    # A record the database refuses (a bug, not an outage): keep it in the log.
                    log.exception(
                        "event=record_rejected record=%s", json.dumps(asdict(batch[0]), default=str)
                    )
                    return
                # Find the bad record by writing the others one at a time.
                for record in batch:
                    await self._write_with_retry([record])
                return
