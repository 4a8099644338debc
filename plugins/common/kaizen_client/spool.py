"""Reports the server could not take are kept in a spool directory and sent on the next run.

Layout (default ``<repository root>/.kaizen/spool``)::

    .kaizen/spool/<run id>.json            waiting to be sent, oldest first
    .kaizen/spool/rejected/<run id>.json   refused by the server (4xx other than 409/429)

Resending is safe: the server stores a run once by its ``run_id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaizen_client.client import KaizenClient, KaizenRejected, KaizenUnavailable
from kaizen_client.ledger import Warn
from kaizen_client.report import refusal_warnings

__all__ = ["DEFAULT_SPOOL", "Delivery", "FlushResult", "Spool", "deliver", "spool_dir"]

DEFAULT_SPOOL = Path(".kaizen") / "spool"
"""The spool directory, relative to the repository root."""

_log = logging.getLogger("kaizen_client")
_MIN_REQUEST_TIME = 0.05  # seconds; below this a request is not attempted


def _log_warning(message: str) -> None:
    _log.warning("%s", message)


def spool_dir(root: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The spool directory: ``$KAIZEN_SPOOL_DIR`` if set (point it at a directory your CI
    caches between runs), else ``<root>/.kaizen/spool``."""
    env = os.environ if environ is None else environ
    configured = env.get("KAIZEN_SPOOL_DIR", "").strip()
    return Path(configured).expanduser() if configured else Path(root) / DEFAULT_SPOOL


def _file_name(run_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:150] or "run"
    if safe != run_id:  # keep distinct run ids apart after the substitution
        safe += "-" + hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:10]
    return safe + ".json"


@dataclass
class FlushResult:
    """What :meth:`Spool.flush` did."""

    sent: int = 0
    rejected: int = 0
    remaining: int = 0
    unavailable: str | None = None
    """Why sending stopped, when the server could not be reached."""


@dataclass
class Delivery:
    """What became of one report handed to :func:`deliver`."""

    run_id: str
    sent: bool = False
    answer: dict[str, Any] | None = None
    spooled_to: Path | None = None
    rejected_to: Path | None = None
    error: str | None = None
    resent: int = 0
    """Spooled reports of earlier runs sent first."""


class Spool:
    """A directory of JSON reports waiting to be sent."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def rejected_directory(self) -> Path:
        """Where reports the server refused are moved."""
        return self.directory / "rejected"

    def save(self, report: dict[str, Any], *, rejected: bool = False) -> Path:
        """Write ``report`` as ``<run_id>.json`` (atomically) and return its path.

        Like the server, the spool keeps the first report of a run: when one with the same
        ``run_id`` is already waiting (say, the pytest plugin's, inside ``kaizen-report``), it
        stays and ``report`` is dropped.
        """
        directory = self.rejected_directory if rejected else self.directory
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / _file_name(str(report.get("run_id", "run")))
        if target.exists() and not rejected:
            return target
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(report, handle, ensure_ascii=False)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target

    def pending(self) -> list[Path]:
        """Spooled reports, oldest first."""
        try:
            files = [p for p in self.directory.glob("*.json") if p.is_file()]
        except OSError:
            return []

        def age(path: Path) -> tuple[int, str]:
            try:
                return (path.stat().st_mtime_ns, path.name)
            except OSError:
                return (0, path.name)

        return sorted(files, key=age)

    def _reject(self, path: Path) -> Path:
        self.rejected_directory.mkdir(parents=True, exist_ok=True)
        target = self.rejected_directory / path.name
        os.replace(path, target)
        return target

    def flush(
        self,
        client: KaizenClient,
        *,
        deadline: float | None = None,
        warn: Warn | None = None,
    ) -> FlushResult:
        """Send spooled reports oldest first, deleting each the server took.

        Stops at the first connection failure, timeout, 5xx or 429 (the rest stay), or when
        ``deadline`` (a ``time.monotonic()`` value) is near. A report refused with another 4xx,
        or one that is not valid JSON, is moved to ``rejected/`` with a warning; one answered
        409 stays for the next run.
        """
        warn = warn or _log_warning
        result = FlushResult()
        queue = self.pending()
        for index, path in enumerate(queue):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining < _MIN_REQUEST_TIME:
                result.remaining = len(queue) - index
                result.unavailable = result.unavailable or "out of time"
                return result
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(report, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                continue  # another process sent it
            except (OSError, ValueError) as exc:
                moved = self._reject(path)
                result.rejected += 1
                warn(f"kaizen: spooled report {path.name} is unreadable ({exc}); moved to {moved}")
                continue
            try:
                answer = client.post_outcome(report, timeout=remaining)
            except KaizenUnavailable as exc:
                result.unavailable = str(exc)
                result.remaining = len(queue) - index
                return result
            except KaizenRejected as exc:
                if exc.status == 429:
                    result.unavailable = str(exc)
                    result.remaining = len(queue) - index
                    return result
                if exc.retryable:
                    result.remaining += 1
                    continue
                moved = self._reject(path)
                result.rejected += 1
                warn(
                    f"kaizen: the server refused spooled report {path.name} ({exc}); "
                    f"moved to {moved}"
                )
                continue
            path.unlink(missing_ok=True)
            result.sent += 1
            for line in refusal_warnings(answer):
                warn(f"{line} [spooled run {report.get('run_id')}]")
        return result


def deliver(
    client: KaizenClient,
    report: dict[str, Any],
    spool: Spool,
    *,
    budget: float = 5.0,
    warn: Warn | None = None,
) -> Delivery:
    """Send spooled reports, then ``report``, within ``budget`` seconds in all.

    When the server cannot take ``report`` now it is spooled; when it refuses it (4xx other than
    409/429) it is written to ``rejected/`` with a warning. Never raises for network or server
    trouble; raises ``OSError`` only when the spool itself cannot be written.
    """
    warn = warn or _log_warning
    deadline = time.monotonic() + budget
    delivery = Delivery(run_id=str(report.get("run_id")))
    flushed = spool.flush(client, deadline=deadline, warn=warn)
    delivery.resent = flushed.sent
    if flushed.unavailable is not None:
        delivery.error = flushed.unavailable
        delivery.spooled_to = spool.save(report)
        return delivery
    remaining = deadline - time.monotonic()
    if remaining < _MIN_REQUEST_TIME:
        delivery.error = "out of time"
        delivery.spooled_to = spool.save(report)
        return delivery
    try:
        delivery.answer = client.post_outcome(report, timeout=remaining)
        delivery.sent = True
    except KaizenUnavailable as exc:
        delivery.error = str(exc)
        delivery.spooled_to = spool.save(report)
    except KaizenRejected as exc:
        delivery.error = str(exc)
        if exc.retryable:
            delivery.spooled_to = spool.save(report)
        else:
            delivery.rejected_to = spool.save(report, rejected=True)
            warn(f"kaizen: the server refused the report ({exc}); kept in {delivery.rejected_to}")
    return delivery
