"""Writes completion records off the request path, without losing an acknowledged one.

A request only hands its record over (:meth:`Recorder.submit`, never blocks). With a journal
(the server always has one), a background task appends the records to the local journal and
fsyncs it in groups, and :class:`DurableAckMiddleware` holds back the rest of that request's
response until its record is journaled: a client never sees a response whose record a crash
could lose. A second task writes journaled records to the database in batches in a worker
thread (so SQLite never blocks the event loop), skipping ids already stored, and tells the
journal which records it may forget.

While the database is unreachable, writes are retried and records stay journaled; ``stop()``
waits at most ``drain_timeout`` for the database and leaves the rest in the journal, which the
next start replays. A record the database refuses (a bug, not an outage) is logged in full
(``event=record_rejected``) rather than retried for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.store.completions import CompletionRecord
from server.store.journal import (
    DatabaseUnavailableError,
    Journal,
    is_database_unavailable,
    save_new_completions,
)

log = logging.getLogger(__name__)


@dataclass
class _Ack:
    """The newest record one HTTP request submitted, which its response must wait for."""

    recorder: Recorder | None = None
    seq: int = 0


_request_ack: ContextVar[_Ack | None] = ContextVar("kaizen_request_ack", default=None)


class _Watermark:
    """A sequence number that only grows, and lets tasks wait until it reaches theirs. Records
    are journaled and written in submission order, so one number says "all up to here"."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Condition()

    async def advance(self, seq: int) -> None:
        async with self._changed:
            if seq > self.value:
                self.value = seq
                self._changed.notify_all()

    async def wait_for(self, seq: int) -> None:
        if self.value >= seq:
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.value >= seq)


class Recorder:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        journal: Journal | None = None,
        batch_size: int = 64,
        retry_delay: float = 1.0,
        drain_timeout: float = 10.0,
    ) -> None:
        self._session_factory = session_factory
        self._journal = journal
        self._batch_size = batch_size
        self._retry_delay = retry_delay
        self._drain_timeout = drain_timeout
        self._to_journal: list[tuple[int, CompletionRecord]] = []
        self._journal_wakeup = asyncio.Event()
        self._to_write: asyncio.Queue[tuple[int, CompletionRecord]] = asyncio.Queue()
        self._writing: list[CompletionRecord] = []  # the batch being written or retried
        self._seq = 0  # records submitted (or replayed) so far
        self._durable = _Watermark()  # records journaled (all of them without a journal)
        self._stored = _Watermark()  # records written, found stored already, or rejected
        self._tasks: list[asyncio.Task[None]] = []
        self._journal_thread = ThreadPoolExecutor(1, thread_name_prefix="kaizen-journal")
        self._closing = False
        self._batch_duplicates = 0
        self.written = 0
        self.duplicates = 0  # already stored (a journal replayed after a crash)
        self.rejected = 0
        # None: no write tried yet; False: the last write found the database unreachable.
        self.database_available: bool | None = None
        self.unavailable_since: float | None = None
        self.journal_failing = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Open the journal (replaying what an earlier process left), start the writers."""
        if self._journal is not None:
            for record in self._journal.open():  # journaled already: straight to the writer
                self._seq += 1
                self._to_write.put_nowait((self._seq, record))
            self._durable.value = self._seq
            self._tasks.append(asyncio.create_task(self._journal_loop(), name="kaizen-journal"))
        self._tasks.append(asyncio.create_task(self._write_loop(), name="kaizen-recorder"))

    async def stop(self, timeout: float | None = None) -> None:
        """Journal everything submitted, give the database up to ``timeout`` seconds (default:
        ``drain_timeout``) to take it, then stop; what it did not take stays journaled."""
        self._closing = True
        if not self._tasks:
            return
        timeout = self._drain_timeout if timeout is None else timeout
        target = self._seq
        self._journal_wakeup.set()
        await self._durable.wait_for(target)  # local disk: no reason to give up on it
        try:
            await asyncio.wait_for(self._stored.wait_for(target), timeout)
        except TimeoutError:
            self._report_unwritten(target, timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._journal_thread.shutdown(wait=True)
        left = self._journal.close() if self._journal is not None else 0
        log.info(
            "event=recorder_stopped written=%d duplicates=%d rejected=%d left_in_journal=%d",
            self.written,
            self.duplicates,
            self.rejected,
            left,
        )

    def _report_unwritten(self, target: int, timeout: float) -> None:
        unwritten = target - self._stored.value
        if self._journal is not None:
            log.warning(
                "event=recorder_drain_timeout unwritten=%d waited_s=%.1f journal=%s "
                "(the database did not take them; the next start replays them)",
                unwritten,
                timeout,
                self._journal.directory,
            )
            return
        # No journal (tests, tools): these records exist nowhere else, so keep them in the log.
        pending = list(self._writing) + [r for _, r in self._to_write._queue]  # type: ignore[attr-defined]
        for record in pending:
            log.error("event=record_lost record=%s", json.dumps(asdict(record), default=str))

    # ------------------------------------------------------------------ requests

    def submit(self, record: CompletionRecord) -> None:
        """Hand a record over; never blocks and never raises into the request. Inside a request
        served through :class:`DurableAckMiddleware`, the response waits for it to be durable."""
        if self._closing and not self._tasks:
            log.error("event=record_after_stop record=%s", json.dumps(asdict(record), default=str))
            return
        self._seq += 1
        ack = _request_ack.get()
        if ack is not None:
            ack.recorder, ack.seq = self, self._seq
        if self._journal is None:
            self._durable.value = self._seq  # nothing to wait for
            self._to_write.put_nowait((self._seq, record))
        else:
            self._to_journal.append((self._seq, record))
            self._journal_wakeup.set()

    async def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` (and every earlier one) would survive a crash."""
        if self._durable.value >= seq:
            return
        try:
            await asyncio.wait_for(self._durable.wait_for(seq), 30)
        except TimeoutError:
            log.error("event=journal_wait_timeout seq=%d (responding anyway)", seq)

    @property
    def pending(self) -> int:
        """Records submitted and not yet in the database."""
        return self._seq - self._stored.value

    async def flush(self) -> None:
        """Wait until every record submitted so far is written (tests, tools)."""
        await self._stored.wait_for(self._seq)

    async def settle(self, timeout: float = 5.0) -> None:
        """Like :meth:`flush`, but bounded, for requests that must read what was just recorded
        (feedback naming a completion): raises :class:`DatabaseUnavailableError` (a 503) when
        the database is down or does not take the records within ``timeout`` seconds."""
        target = self._seq
        if self._stored.value >= target:
            return
        if self.database_available is False:
            raise DatabaseUnavailableError(
                "The database is unavailable; the completions are kept and will be written "
                "when it is back. Retry later."
            )
        try:
            await asyncio.wait_for(self._stored.wait_for(target), timeout)
        except TimeoutError:
            raise DatabaseUnavailableError(
                f"The database did not take this server's records within {timeout:.0f} s; "
                "retry later."
            ) from None

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: the database as the writer last found it, and the backlog."""
        database = {None: "unknown", True: "ok", False: "unavailable"}[self.database_available]
        out: dict[str, Any] = {"database": database, "unwritten_records": self.pending}
        if self.unavailable_since is not None:
            out["database_unavailable_s"] = round(time.monotonic() - self.unavailable_since, 1)
        if self._journal is not None:
            out["journal"] = "failing" if self.journal_failing else "ok"
            out["journaled_records"] = self._journal.pending
        return out

    # ------------------------------------------------------------------ the journal

    async def _journal_loop(self) -> None:
        assert self._journal is not None
        while True:
            await self._journal_wakeup.wait()
            self._journal_wakeup.clear()
            batch, self._to_journal = self._to_journal, []
            if not batch:
                continue
            try:
                # One write and one fsync for everything submitted meanwhile (group commit), on
                # a thread of its own: responses wait for it, and the shared pool can be full of
                # calls stuck on a database that hangs.
                await asyncio.get_running_loop().run_in_executor(
                    self._journal_thread, self._journal.append, [r for _, r in batch]
                )
                self.journal_failing = False
            except Exception:
                self.journal_failing = True
                log.exception(
                    "event=journal_append_failed count=%d dir=%s (these records are only in "
                    "memory until the database has them: check the disk)",
                    len(batch),
                    self._journal.directory,
                )
            for item in batch:
                self._to_write.put_nowait(item)
            await self._durable.advance(batch[-1][0])

    # ------------------------------------------------------------------ the database

    def _write(self, batch: list[CompletionRecord]) -> None:
        # One writer task awaits one call at a time, so the count is read back without a race.
        self._batch_duplicates = 0
        with self._session_factory() as session:
            self._batch_duplicates = save_new_completions(session=session, records=batch)
        self._forget(batch)

    def _forget(self, batch: list[CompletionRecord]) -> None:
        if self._journal is None:
            return
        try:
            self._journal.committed(r.id for r in batch)
        except OSError:
            # The records are stored; a segment left behind is replayed as duplicates, skipped.
            log.exception("event=journal_cleanup_failed")

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._to_write.get()]
            while len(batch) < self._batch_size and not self._to_write.empty():
                batch.append(self._to_write.get_nowait())
            self._writing = [r for _, r in batch]
            await self._write_with_retry(self._writing)
            self._writing = []
            await self._stored.advance(batch[-1][0])

    async def _write_with_retry(self, batch: list[CompletionRecord]) -> None:
        while True:
            try:
                await asyncio.to_thread(self._write, batch)
                duplicates = self._batch_duplicates
            except Exception as exc:
                if is_database_unavailable(exc):
                    self._mark_unavailable(exc, len(batch))
                    await asyncio.sleep(self._retry_delay)
                    continue
                if len(batch) == 1:
                    # A record the database refuses (a bug, not an outage): keep it in the log.
                    log.exception(
                        "event=record_rejected record=%s", json.dumps(asdict(batch[0]), default=str)
                    )
                    self.rejected += 1
                    await asyncio.to_thread(self._forget, batch)
                    return
                # Find the bad record by writing the others one at a time.
                for record in batch:
                    await self._write_with_retry([record])
                return
            self.written += len(batch) - duplicates
            self.duplicates += duplicates
            if duplicates:
                log.info("event=records_already_stored count=%d", duplicates)
            if self.database_available is False:
                assert self.unavailable_since is not None
                log.warning(
                    "event=database_available again_after_s=%.1f backlog=%d",
                    time.monotonic() - self.unavailable_since,
                    self.pending,
                )
            self.database_available, self.unavailable_since = True, None
            return

    def _mark_unavailable(self, exc: BaseException, count: int) -> None:
        if self.database_available is not False:
            self.unavailable_since = time.monotonic()
            log.error(
                "event=database_unavailable count=%d retry_every_s=%.1f error=%r (records are "
                "journaled and written when it is back)",
                count,
                self._retry_delay,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        self.database_available = False


class DurableAckMiddleware:
    """Holds back a response's bytes from the moment its request submitted a record until that
    record is journaled. A plain JSON response waits before its first byte; a stream waits
    before the chunks that follow the record (the usage chunk and ``[DONE]``), so the client's
    acknowledgment always implies a durable record. Costs one group-committed fsync."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ack = _Ack()
        token = _request_ack.set(ack)

        async def send_when_durable(message: Message) -> None:
            if ack.seq and ack.recorder is not None:
                seq, ack.seq = ack.seq, 0
                await ack.recorder.wait_durable(seq)
            await send(message)

        try:
            await self.app(scope, receive, send_when_durable)
        finally:
            _request_ack.reset(token)
