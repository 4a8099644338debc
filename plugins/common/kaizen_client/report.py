"""Building the outcome report (``POST /v1/outcomes`` in ``plugins/PROTOCOL.md``).

The server validates strictly (unknown keys are refused), so the report holds exactly the
protocol's keys.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kaizen_client.ledger import Located
from kaizen_client.repository import git

__all__ = [
    "FAILING_TEST_STATUSES",
    "LOG_TAIL_BYTES",
    "RUN_STATUSES",
    "TEST_STATUSES",
    "LogTail",
    "TestResult",
    "attribute",
    "build_report",
    "detect_branch",
    "detect_commit",
    "detect_run_id",
    "now_iso",
    "refusal_warnings",
    "summarise",
    "tail_text",
]

RUN_STATUSES = ("passed", "failed", "build_failed", "error")
"""A run's and a completion's status."""
TEST_STATUSES = ("passed", "failed", "error", "skipped")
"""A test's status."""
FAILING_TEST_STATUSES = ("failed", "error")
LOG_TAIL_BYTES = 64 * 1024
"""How much of the end of the output a report carries (UTF-8 bytes; the server's limit is
65,536 characters)."""

_MAX_RUN_ID = 256
_MAX_NAME = 4096
_MAX_BRANCH = 256
_MAX_MESSAGE = 2000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def now_iso() -> str:
    """The current time, ISO 8601 in UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (3.9)


def detect_run_id(environ: Mapping[str, str] | None = None) -> str:
    """A run id unique per CI run, from the CI's environment.

    ``$KAIZEN_RUN_ID`` if set; GitHub Actions ``github:<GITHUB_RUN_ID>:<GITHUB_RUN_ATTEMPT>``;
    GitLab ``gitlab:<CI_JOB_ID>`` (``CI_PIPELINE_ID`` when there is no job id); Jenkins
    ``jenkins:<BUILD_TAG>``; elsewhere ``local:<uuid4>``. Ids longer than the server's 256
    characters are shortened with a hash.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        return env.get(name, "").strip()

    if get("KAIZEN_RUN_ID"):
        run_id = get("KAIZEN_RUN_ID")
    elif get("GITHUB_RUN_ID"):
        run_id = f"github:{get('GITHUB_RUN_ID')}:{get('GITHUB_RUN_ATTEMPT') or '1'}"
    elif get("CI_JOB_ID") or get("CI_PIPELINE_ID"):
        run_id = f"gitlab:{get('CI_JOB_ID') or get('CI_PIPELINE_ID')}"
    elif get("BUILD_TAG"):
        run_id = f"jenkins:{get('BUILD_TAG')}"
    else:
        run_id = f"local:{uuid.uuid4()}"
    if len(run_id) > _MAX_RUN_ID:
        digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:16]
        run_id = f"{run_id[: _MAX_RUN_ID - 17]}-{digest}"
    return run_id


def detect_commit(root: Path, environ: Mapping[str, str] | None = None) -> str:
    """``git rev-parse HEAD`` at ``root``; else the CI's commit variable; else ``"unknown"``."""
    env = os.environ if environ is None else environ
    commit = git(root, "rev-parse", "HEAD")
    if not commit:
        for name in ("GITHUB_SHA", "CI_COMMIT_SHA", "GIT_COMMIT"):
            if env.get(name, "").strip():
                commit = env[name].strip()
                break
    return _clip(commit or "unknown", 64)


def detect_branch(root: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The branch being built: from the CI's variables (CI checkouts are often detached), else
    ``git rev-parse --abbrev-ref HEAD``; ``None`` when unknown (a detached HEAD outside CI)."""
    env = os.environ if environ is None else environ
    for name in (
        "GITHUB_HEAD_REF",  # pull requests: the source branch
        "GITHUB_REF_NAME",
        "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME",
        "CI_COMMIT_BRANCH",
        "CI_COMMIT_REF_NAME",
        "CHANGE_BRANCH",  # Jenkins multibranch pull requests
        "BRANCH_NAME",
        "GIT_BRANCH",
    ):
        value = env.get(name, "").strip()
        if value:
            if name == "GIT_BRANCH" and value.startswith("origin/"):
                value = value[len("origin/") :]
            return _clip(value, _MAX_BRANCH)
    branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return _clip(branch, _MAX_BRANCH) if branch and branch != "HEAD" else None


def tail_text(text: str, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of ``text``: at most ``limit`` UTF-8 bytes, cut at a character boundary."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[-limit:].decode("utf-8", "ignore")


class LogTail:
    """Keeps the last ``limit`` bytes of a byte stream (thread-safe)."""

    def __init__(self, limit: int = LOG_TAIL_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Append output; only the last ``limit`` bytes are kept."""
        with self._lock:
            self._buffer += data
            excess = len(self._buffer) - self.limit
            if excess > 0:
                del self._buffer[:excess]

    def text(self) -> str:
        """The kept bytes as text (invalid UTF-8 replaced, a cut character dropped)."""
        with self._lock:
            data = bytes(self._buffer)
        text = data.decode("utf-8", "replace")
        # A multi-byte character cut at the start decodes to replacement characters: drop them.
        if data and len(data) >= self.limit:
            text = text.lstrip("\ufffd")
        return text


@dataclass
class TestResult:
    """One test's result as the protocol reports it."""

    __test__ = False  # not a pytest test class

    name: str
    status: str
    duration: float | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The protocol's JSON object (name and message clipped to sane sizes)."""
        return {
            "name": _clip(self.name, _MAX_NAME),
            "status": self.status,
            "duration": None if self.duration is None else max(round(self.duration, 6), 0.0),
            "message": None if self.message is None else _clip(self.message, _MAX_MESSAGE),
        }


def attribute(
    located: Iterable[Located],
    run_status: str,
    tests_by_completion: Mapping[tuple[str, int], Sequence[str]] | None = None,
    test_statuses: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The report's ``completions``: each located completion with its status.

    With per-test attribution (``tests_by_completion``: the tests that executed each
    completion's lines; ``test_statuses``: each test's status) a completion is ``failed`` if any
    of its tests failed or errored, ``passed`` if its tests passed; otherwise, and when its tests
    were all skipped, it gets ``run_status`` and an empty ``tests`` list.
    """
    statuses = test_statuses or {}
    out: list[dict[str, Any]] = []
    for item in located:
        names = list(dict.fromkeys((tests_by_completion or {}).get(item.key, ())))
        found = [statuses.get(name, "skipped") for name in names]
        if any(status in FAILING_TEST_STATUSES for status in found):
            status = "failed"
        elif "passed" in found:
            status = "passed"
        else:
            status, names = run_status, []
        out.append(
            {
                "completion_id": item.entry.completion_id,
                "choice_index": item.entry.choice_index,
                "file_path": item.entry.file_path,
                "final_text": item.final_text,
                "status": status,
                "tests": [_clip(name, _MAX_NAME) for name in names],
            }
        )
    return out


def build_report(
    *,
    run_id: str,
    repository: str,
    commit: str,
    branch: str | None,
    status: str,
    started_at: str | None,
    finished_at: str | None,
    tests: Sequence[TestResult] = (),
    log_tail: str = "",
    completions: Sequence[dict[str, Any]] = (),
    executability: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The outcome report, exactly the protocol's keys (``executability`` only when there is
    any: the completions no test exercised, checked by :mod:`kaizen_client.executability`)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
    extra = {"executability": list(executability)} if executability else {}
    return {
        "run_id": run_id,
        "repository": repository,
        "commit": commit,
        "branch": branch,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "tests": [test.to_dict() for test in tests],
        "log_tail": tail_text(log_tail),
        "completions": list(completions),
        **extra,
    }


def summarise(report: Mapping[str, Any]) -> str:
    """``"2 completions (1 passed, 1 failed)"`` for a report."""
    completions = report.get("completions") or []
    counts: dict[str, int] = {}
    for completion in completions:
        counts[completion["status"]] = counts.get(completion["status"], 0) + 1
    noun = "completion" if len(completions) == 1 else "completions"
    if not counts:
        return f"0 {noun}"
    detail = ", ".join(f"{counts[s]} {s}" for s in RUN_STATUSES if s in counts)
    return f"{len(completions)} {noun} ({detail})"


# What a refusal in the server's answer means, and what to do about it (``plugins/PROTOCOL.md``,
# "Refusals"). A reason this client does not know is printed as it is.
_REFUSALS = {
    "repository_not_in_scope": (
        "served in a repository this CI token does not cover: report them with a token "
        "created with `kaizen tokens create --role ci --repo <that repository>` "
        "(or --all-repos on a single-team install)"
    ),
    "not_owner": "served to another user's token",
    "repository_mismatch": "their entry names another repository than the one they were served in",
    "stale": "the server holds a newer update",
}


def refusal_warnings(answer: Mapping[str, Any] | None, *, limit: int = 5) -> list[str]:
    """One warning line per reason the server gave in its answer's ``refused`` list: the
    completions it took no verdict for, so that a CI log says which and why.

    Tolerates an answer without the list (older servers) or with malformed items.
    """
    refused = (answer or {}).get("refused")
    if not isinstance(refused, list):
        return []
    by_reason: dict[str, list[str]] = {}
    for item in refused:
        if isinstance(item, Mapping) and isinstance(item.get("completion_id"), str):
            reason = str(item.get("reason") or "refused")
            ids = by_reason.setdefault(reason, [])
            if item["completion_id"] not in ids:
                ids.append(item["completion_id"])
    lines = []
    for reason, ids in by_reason.items():
        more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
        shown = ", ".join(ids[:limit]) + more
        noun = "completion" if len(ids) == 1 else "completions"
        why = _REFUSALS.get(reason, reason)
        lines.append(f"kaizen: warning: the server refused {len(ids)} {noun} ({shown}): {why}")
    return lines
