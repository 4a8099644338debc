"""CI-side exploration: the project's own tests as the oracle for alternatives of a completion.

After a test run, for up to ``limit`` completions with a per-test verdict (one side only: a run
gives each completion one verdict), ask the server for ``k`` alternatives sampled from the
completion's recorded context (``POST /v1/resample``), splice each into the file where the
completion was found, re-run only the tests attributed to it in a pytest subprocess, restore the
file byte for byte, and report each alternative's verdict as an outcome of its own run
(``<run id>:explore``). The trainer pairs passing and failing texts of the same context
(``ci_resample`` pairs).

The working tree is never left modified:

* before a file is touched its original bytes, mode and times go to a journal outside the tree
  (under the temporary directory, named after the checkout);
* a guardian process, in a session of its own, holds a pipe from this process: when the pipe
  closes without the journal having been cleared (this process was killed, even by SIGKILL) it
  stops the test subprocess and writes the originals back;
* a later run of the plugin or of ``kaizen-report`` in the same checkout restores any journal
  left over (a guardian killed too) before it reads a file.

A verdict is *sealed* only when pytest's own reports (:mod:`pytest_kaizen.probe`) say so:
``passed`` when every attributed test was collected, ran and passed (no skip, xfail or xpass)
and pytest exited 0; ``failed`` when one of them failed or errored and pytest exited 1;
``build_failed`` when collection failed (the alternative broke an import). Anything else (a
test missing, a skip, a timeout, another exit status) gives no verdict and is not reported.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaizen_client.client import KaizenClient, KaizenError, KaizenRejected
from kaizen_client.ledger import Located, Warn

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_K",
    "Exploration",
    "Verdict",
    "explore",
    "journal_path",
    "judge",
    "recover",
    "run_alternative",
]

DEFAULT_K = 4
"""Alternatives asked for each explored completion."""
DEFAULT_BUDGET = 120.0
"""Seconds one run may spend exploring, server calls and test runs together."""
MAX_K = 8
RESULTS_VARIABLE = "KAIZEN_EXPLORE_RESULTS"
_log = logging.getLogger("kaizen_client")


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()


# --- the journal and its guardian -------------------------------------------------------------


def journal_path(root: Path, temp_dir: str | None = None) -> Path:
    """Where the journal of the checkout at ``root`` lives: outside the tree, so writing it
    never shows up as a change, and found again by the next run in the same checkout."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(temp_dir or tempfile.gettempdir()) / f"kaizen-explore-{digest}" / "journal.json"


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _put_back(path: Path, original: bytes, mode: int, times: tuple[int, int]) -> None:
    """Write ``original`` into ``path`` in place (same inode, so hard links and open handles see
    it) and restore its mode and times."""
    with open(path, "r+b" if path.exists() else "wb") as handle:
        handle.write(original)
        handle.truncate()
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)
    os.utime(path, ns=times)


def _restore_journal(journal: Path) -> list[str]:
    """Write back every file the journal holds; returns their paths. Idempotent."""
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    restored = []
    child = data.get("child")
    if isinstance(child, int) and child > 0:
        with contextlib.suppress(OSError):
            os.killpg(child, signal.SIGKILL)  # a test run still using the spliced file
    for item in data.get("files", []):
        path = Path(item["path"])
        _put_back(path, base64.b64decode(item["original"]), item["mode"], tuple(item["times"]))
        restored.append(str(path))
    journal.unlink(missing_ok=True)
    return restored


def recover(root: Path, *, warn: Warn | None = None, temp_dir: str | None = None) -> list[str]:
    """Restore files an exploration in this checkout left modified (it and its guardian were
    killed); returns the paths restored. Call before reading the working tree."""
    journal = journal_path(root, temp_dir)
    try:
        restored = _restore_journal(journal)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        (warn or _log.warning)(
            f"kaizen: could not restore files from the exploration journal {journal}: {exc}; "
            "check the working tree (git status) before building"
        )
        return []
    if restored:
        (warn or _log.warning)(
            f"kaizen: restored {len(restored)} file(s) an interrupted exploration left "
            f"modified ({restored[0]})"
        )
    return restored


class _Guard:
    """The journal of one splice and the guardian that restores it if this process dies."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self._guardian: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Guard:
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "kaizen_client.explore", "--guard", str(self.journal)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # survives a kill of this process's group
        )
        return self

    def record(self, path: Path, original: bytes, child: int | None = None) -> None:
        stat = path.stat()
        entry = {
            "path": str(path),
            "original": base64.b64encode(original).decode("ascii"),
            "mode": stat.st_mode & 0o7777,
            "times": [stat.st_atime_ns, stat.st_mtime_ns],
        }
        self._write([entry], child)

    def set_child(self, child: int | None) -> None:
        data = json.loads(self.journal.read_text(encoding="utf-8"))
        self._write(data["files"], child)

    def _write(self, files: list[dict[str, Any]], child: int | None) -> None:
        _write_durably(self.journal, json.dumps({"files": files, "child": child}).encode())

    def restore(self) -> None:
        _restore_journal(self.journal)

    def __exit__(self, *exc: object) -> None:
        try:
            self.restore()
        finally:
            guardian = self._guardian
            if guardian is not None and guardian.stdin is not None:
                guardian.stdin.close()  # EOF: the guardian finds no journal and exits
                with contextlib.suppress(subprocess.TimeoutExpired):
                    guardian.wait(5)


def _guard_main(journal: str) -> int:
    """The guardian: wait for the explorer's pipe to close, then restore what is journaled."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the job is the explorer's
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(65536):
            pass
    _restore_journal(Path(journal))
    return 0


# --- one alternative ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What re-running the attributed tests against one alternative showed."""

    status: str | None  # passed | failed | build_failed; None: no sealed verdict
    reason: str  # why, in words
    seconds: float = 0.0


def judge(results: Mapping[str, Any] | None, expected: Sequence[str], exitstatus: int) -> Verdict:
    """The sealed verdict from the probe's results (see the module docstring)."""
    if results is None:
        return Verdict(None, "pytest wrote no results")
    if int(results.get("collection_errors") or 0):
        return Verdict("build_failed", "collection failed")
    collected = set(results.get("collected") or ())
    missing = [n for n in expected if n not in collected]
    if missing:
        return Verdict(None, f"{len(missing)} attributed test(s) not collected ({missing[0]})")
    statuses = results.get("tests") or {}
    found = [statuses.get(n) for n in expected]
    if any(s in ("failed", "error") for s in found) and exitstatus == 1:
        return Verdict("failed", "an attributed test failed")
    if all(s == "passed" for s in found) and exitstatus == 0 and collected == set(expected):
        return Verdict("passed", "every attributed test ran and passed")
    return Verdict(
        None,
        f"no sealed verdict (statuses {sorted(set(map(str, found)))}, exit status {exitstatus})",
    )


def run_alternative(
    *,
    root: Path,
    nodeids: Sequence[str],
    timeout: float,
    python: str = sys.executable,
    on_start: Callable[[int], None] | None = None,
    extra_args: Sequence[str] = (),
) -> Verdict:
    """Run ``nodeids`` with pytest in a subprocess at ``root``, writing nothing into the tree
    (no cache, byte code under a temporary prefix) and reporting nothing to Kaizen."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kaizen-explore-run-") as scratch:
        results_file = Path(scratch) / "results.json"
        env = dict(os.environ)
        env.update(
            {
                RESULTS_VARIABLE: str(results_file),
                # Byte code of the spliced file must not be read from, or left in, __pycache__.
                "PYTHONPYCACHEPREFIX": str(Path(scratch) / "pycache"),
                "PYTHONDONTWRITEBYTECODE": "1",
                "KAIZEN_PYTEST_ACTIVE": "explore",
            }
        )
        env.pop("KAIZEN_URL", None)
        command = [
            python,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:kaizen",
            "-p",
            "pytest_kaizen.probe",
            "-q",
            "--no-header",
            f"--rootdir={root}",
            *extra_args,
            "--",
            *nodeids,
        ]
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if on_start is not None:
            on_start(proc.pid)
        try:
            code = proc.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Verdict(None, f"timed out after {timeout:.0f} s", time.monotonic() - started)
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything the tests left running
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results = None
        verdict = judge(results, nodeids, code)
        return Verdict(verdict.status, verdict.reason, time.monotonic() - started)


def _splice_point(item: Located) -> tuple[bytes, int, int, str] | None:
    """The file's bytes and the character span of the completion in it now, with the line
    ending its match used; None when the file changed since it was located."""
    try:
        raw = item.path.read_bytes()
        content = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = item.final_text
    for variant, newline in ((text, "\n"), (text.replace("\n", "\r\n"), "\r\n")):
        if content[item.offset : item.offset + len(variant)] == variant:
            return raw, item.offset, len(variant), newline
    return None


# --- a whole exploration ------------------------------------------------------------------------


@dataclass
class Exploration:
    """What one exploration did, for the summary line and the report."""

    explored: int = 0
    alternatives: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    completions: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stopped: str | None = None  # why it stopped early

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.verdicts.items())) or "none"
        skipped = sum(self.skipped.values())
        extra = f", {skipped} skipped" if skipped else ""
        stop = f"; stopped: {self.stopped}" if self.stopped else ""
        return (
            f"kaizen: explored {self.explored} completion(s): {self.alternatives} "
            f"alternative(s) judged (verdicts: {counts}{extra}) in {self.seconds:.1f} s{stop}"
        )


def candidates(
    located: Sequence[Located], attributed: Sequence[Mapping[str, Any]], limit: int
) -> list[tuple[Located, list[str], str]]:
    """Up to ``limit`` completions with a per-test verdict, failures first (a passing
    alternative of a failure teaches most), then in the report's order."""
    by_key = {item.key: item for item in located}
    picked = []
    for entry in attributed:
        item = by_key.get((entry["completion_id"], entry["choice_index"]))
        if item is None or not entry.get("tests") or entry["status"] not in ("passed", "failed"):
            continue
        picked.append((item, list(entry["tests"]), str(entry["status"])))
    picked.sort(key=lambda p: p[2] != "failed")
    return picked[: max(limit, 0)]


def explore(
    *,
    client: KaizenClient,
    root: Path,
    located: Sequence[Located],
    attributed: Sequence[Mapping[str, Any]],
    limit: int,
    rootdir: Path | None = None,
    k: int = DEFAULT_K,
    budget: float = DEFAULT_BUDGET,
    test_seconds: Mapping[str, float] | None = None,
    python: str = sys.executable,
    temp_dir: str | None = None,
    extra_args: Sequence[str] = (),
) -> Exploration:
    """Explore up to ``limit`` completions (see the module docstring); never raises for a
    server or test problem, and leaves every file as it found it.

    ``root``: the checkout (it names the journal); ``rootdir``: pytest's rootdir, which the
    node ids in ``attributed`` are relative to (default ``root``); ``test_seconds``: each
    test's duration in the main run, to bound a re-run (3x plus 10 s)."""
    started = time.monotonic()
    deadline = started + max(budget, 0.0)
    result = Exploration()
    k = min(max(k, 1), MAX_K)
    journal = journal_path(root, temp_dir)
    for item, tests, _status in candidates(located, attributed, limit):
        left = deadline - time.monotonic()
        if left < 1:
            result.stopped = f"the {budget:g} s budget ran out"
            break
        try:
            answer = client.resample(
                item.entry.completion_id, item.entry.choice_index, n=k, timeout=min(left, 60)
            )
        except KaizenRejected as exc:  # this completion only (not in scope, exhausted, ...)
            result.warnings.append(f"kaizen: no alternatives for {item.entry.completion_id}: {exc}")
            result.skipped["refused"] += 1
            continue
        except KaizenError as exc:  # unreachable or failing: the rest would fail too
            result.warnings.append(f"kaizen: could not get alternatives: {exc}")
            result.stopped = "the server did not give alternatives"
            break
        result.explored += 1
        # A test run of the attributed tests took this long in the main run: allow 3x + 10 s.
        usual = sum((test_seconds or {}).get(t, 0.0) for t in tests)
        per_run = 3 * usual + 10
        judged: dict[str, Verdict] = {}
        for alternative in answer["alternatives"]:
            text = str(alternative.get("text", ""))
            if alternative.get("finish_reason") == "length":
                result.skipped["cut_off"] += 1  # never trained as complete: not worth a run
                continue
            if _normalise(text) == _normalise(item.final_text):
                result.skipped["same_as_served"] += 1
                continue
            key = _normalise(text)
            if key not in judged:
                left = deadline - time.monotonic()
                if left < 1:
                    result.stopped = f"the {budget:g} s budget ran out"
                    break
                verdict = _judge_in_place(
                    item,
                    text,
                    tests,
                    min(left, per_run),
                    journal,
                    rootdir or root,
                    python,
                    extra_args,
                )
                if verdict is None:
                    result.skipped["file_changed"] += 1
                    continue
                judged[key] = verdict
                result.alternatives += 1
            verdict = judged[key]
            if verdict.status is None:
                result.skipped["no_verdict"] += 1
                continue
            result.verdicts[verdict.status] += 1
            result.completions.append(
                {
                    "completion_id": answer["id"],
                    "choice_index": int(alternative["index"]),
                    "file_path": item.entry.file_path,
                    "final_text": text,
                    "status": verdict.status,
                    "tests": list(tests) if verdict.status != "build_failed" else [],
                }
            )
        if result.stopped:
            break
    result.seconds = time.monotonic() - started
    return result


def _judge_in_place(
    item: Located,
    text: str,
    tests: Sequence[str],
    timeout: float,
    journal: Path,
    rootdir: Path,
    python: str,
    extra_args: Sequence[str],
) -> Verdict | None:
    point = _splice_point(item)
    if point is None:
        return None
    raw, offset, length, newline = point
    content = raw.decode("utf-8")
    spliced = content[:offset] + text.replace("\r\n", "\n").replace("\n", newline)
    spliced += content[offset + length :]
    with _Guard(journal) as guard:
        guard.record(item.path, raw)
        stat = item.path.stat()
        with open(item.path, "r+b") as handle:
            handle.write(spliced.encode("utf-8"))
            handle.truncate()
        # Not the original's time: nothing may take the spliced file for the one it replaced.
        os.utime(item.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        return run_alternative(
            root=rootdir,
            nodeids=tests,
            timeout=timeout,
            python=python,
            on_start=guard.set_child,
            extra_args=extra_args,
        )


if __name__ == "__main__":  # the guardian: python -m kaizen_client.explore --guard JOURNAL
    if len(sys.argv) == 3 and sys.argv[1] == "--guard":
        sys.exit(_guard_main(sys.argv[2]))
    sys.exit("usage: python -m kaizen_client.explore --guard JOURNAL")
