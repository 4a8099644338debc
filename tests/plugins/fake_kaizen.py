"""A fake Kaizen server for the CI clients' tests: ``GET /v1/ledger`` and ``POST /v1/outcomes``
as ``plugins/PROTOCOL.md`` specifies them, on 127.0.0.1 in a thread.

It checks reports as strictly as the real server (unknown or missing keys, bad statuses: 422)
and is idempotent by ``run_id``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

RUN_KEYS = {
    "run_id",
    "repository",
    "commit",
    "branch",
    "status",
    "started_at",
    "finished_at",
    "tests",
    "log_tail",
    "completions",
}
TEST_KEYS = {"name", "status", "duration", "message"}
COMPLETION_KEYS = {"completion_id", "choice_index", "file_path", "final_text", "status", "tests"}
EXECUTABILITY_KEYS = {
    "completion_id",
    "choice_index",
    "final_text",
    "parses",
    "imports",
    "api",
    "runs",
    "executable",
    "problems",
}
RUN_STATUSES = {"passed", "failed", "build_failed", "error"}
TEST_STATUSES = {"passed", "failed", "error", "skipped"}


def report_problems(report: Any) -> list[str]:
    """What the real server's validation would refuse in a report (empty: acceptable)."""
    if not isinstance(report, dict):
        return ["not an object"]
    problems = []
    if set(report) - {"executability"} != RUN_KEYS:  # executability is optional
        problems.append(f"keys {sorted((set(report) - {'executability'}) ^ RUN_KEYS)}")
    for item in report.get("executability") or []:
        if set(item) != EXECUTABILITY_KEYS or not isinstance(item["parses"], bool):
            problems.append(f"executability {item!r}")
    if report.get("status") not in RUN_STATUSES:
        problems.append(f"status {report.get('status')!r}")
    for key in ("run_id", "repository", "commit"):
        if not isinstance(report.get(key), str) or not report.get(key):
            problems.append(f"{key} {report.get(key)!r}")
    if len(report.get("log_tail") or "") > 65_536:
        problems.append("log_tail too long")
    for test in report.get("tests") or []:
        if set(test) != TEST_KEYS or test["status"] not in TEST_STATUSES:
            problems.append(f"test {test!r}")
    for item in report.get("completions") or []:
        if set(item) != COMPLETION_KEYS or item["status"] not in RUN_STATUSES:
            problems.append(f"completion {item!r}")
    return problems


@dataclass
class FakeKaizen:
    """State and knobs of the fake server."""

    token: str = "kz_ci_secret"
    ledger: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Reports stored, in arrival order (duplicates are not stored again)."""
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    """(method, path with query, headers) of every request."""
    outcome_status: int | None = None
    """Answer every ``POST /v1/outcomes`` with this status (an error), when set."""
    delay: float = 0.0
    """Seconds to wait before answering any request."""
    refused: dict[str, str] = field(default_factory=dict)
    """Completion id -> reason: the server refuses these completions of a report (as the real
    one does for a scoped token's foreign completions) and lists them in its answer."""
    url: str = ""

    @property
    def run_ids(self) -> list[str]:
        """The run ids of the stored reports."""
        return [report["run_id"] for report in self.reports]


def _handler(state: FakeKaizen) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            error = {"message": message, "type": "invalid_request_error", "param": None}
            self._answer(status, {"error": {**error, "code": code}})

        def _begin(self) -> bool:
            state.requests.append((self.command, self.path, dict(self.headers.items())))
            if state.delay:
                time.sleep(state.delay)
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                self._error(401, "missing or invalid token", "invalid_token")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._begin():
                return
            parts = urlsplit(self.path)
            if parts.path != "/v1/ledger":
                self._error(404, "not found")
                return
            query = parse_qs(parts.query)
            if "repository" not in query:
                self._error(422, "repository is required")
                return
            repository = query["repository"][0]
            entries = [
                e
                for e in state.ledger
                if e["repository"] == repository and e.get("state", "active") == "active"
            ]
            entries.sort(key=lambda e: e["updated_at"], reverse=True)
            self._answer(200, {"data": entries, "count": len(entries)})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._begin():
                return
            if urlsplit(self.path).path != "/v1/outcomes":
                self._error(404, "not found")
                return
            if state.outcome_status is not None:
                self._error(state.outcome_status, "refused by the test's settings")
                return
            try:
                report = json.loads(raw)
            except ValueError:
                self._error(400, "malformed JSON")
                return
            problems = report_problems(report)
            if problems:
                self._error(422, "; ".join(problems), "validation_error")
                return
            with lock:
                duplicate = report["run_id"] in state.run_ids
                if not duplicate:
                    state.reports.append(report)
            refused = [
                {
                    "completion_id": c["completion_id"],
                    "choice_index": c["choice_index"],
                    "reason": r,
                }
                for c in report["completions"]
                if (r := state.refused.get(c["completion_id"])) is not None
            ]
            self._answer(
                200,
                {
                    "run_id": report["run_id"],
                    "duplicate": duplicate,
                    "completions": 0 if duplicate else len(report["completions"]) - len(refused),
                    "unknown_completion_ids": [],
                    "refused": refused,
                },
            )

    return Handler


def ledger_entry(
    completion_id: str,
    text: str,
    *,
    repository: str = "local/calc-project",
    file_path: str = "src/calc.py",
    current_text: str | None = None,
    start_offset: int | None = None,
    state: str = "active",
    updated_at: str = "2026-11-22T10:00:00Z",
    choice_index: int = 0,
) -> dict[str, Any]:
    """A protocol ledger entry."""
    return {
        "completion_id": completion_id,
        "choice_index": choice_index,
        "repository": repository,
        "file_path": file_path,
        "inserted_text": text,
        "current_text": text if current_text is None else current_text,
        "start_offset": start_offset,
        "state": state,
        "updated_at": updated_at,
    }


@contextmanager
def running(state: FakeKaizen | None = None) -> Iterator[FakeKaizen]:
    """Serve ``state`` (a new one by default) on 127.0.0.1; ``state.url`` is set."""
    state = state or FakeKaizen()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def unused_url() -> str:
    """A loopback URL on which nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
