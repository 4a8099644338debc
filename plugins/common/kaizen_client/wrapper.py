"""``kaizen-report``: run any build or test command and report its outcome to Kaizen.

    kaizen-report [--url URL] [--token T] [--build-failed-codes 2] [--status-map 3=error] \\
        -- make test

The command's output passes through unchanged as it comes; its last 64 KiB go into the report.
Exit code 0 is ``passed``, anything else ``failed`` (unless mapped otherwise), and every
located ledger completion gets the run's status (no per-test attribution; use the pytest
plugin for that). The wrapper always exits with the command's own exit code; reporting
problems are one line on stderr, never a different exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kaizen_client.client import KaizenClient
from kaizen_client.collect import collect_completions, settings_from
from kaizen_client.explore import recover
from kaizen_client.report import (
    RUN_STATUSES,
    LogTail,
    attribute,
    build_report,
    detect_branch,
    detect_commit,
    detect_run_id,
    now_iso,
    refusal_warnings,
    summarise,
)
from kaizen_client.repository import find_root
from kaizen_client.spool import Spool, deliver, spool_dir

__all__ = ["main", "parse_status_map", "run_command", "status_for"]

PROG = "kaizen-report"
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_status_map(values: Sequence[str]) -> dict[int, str]:
    """Parse ``CODE=STATUS`` pairs (comma-separated or repeated): ``["2=build_failed,3=error"]``.

    Raises ``ValueError`` on a bad pair or an unknown status.
    """
    mapping: dict[int, str] = {}
    for value in values:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            code, sep, status = pair.partition("=")
            if not sep or status.strip() not in RUN_STATUSES:
                raise ValueError(
                    f"bad status mapping {pair!r}: expected CODE=STATUS with STATUS one of "
                    + ", ".join(RUN_STATUSES)
                )
            mapping[int(code)] = status.strip()
    return mapping


def _parse_codes(values: Sequence[str]) -> set[int]:
    return {int(c) for value in values for c in value.split(",") if c.strip()}


def status_for(returncode: int, status_map: dict[int, str], build_failed: set[int]) -> str:
    """The run status of an exit code: an explicit mapping first, then ``build_failed`` codes,
    then 0 ``passed``, killed by a signal ``error``, anything else ``failed``."""
    if returncode in status_map:
        return status_map[returncode]
    if returncode in build_failed:
        return "build_failed"
    if returncode == 0:
        return "passed"
    return "error" if returncode < 0 else "failed"


def _pump(source: IO[bytes], sink: IO[Any], tail: LogTail) -> None:
    """Copy a pipe to our stdout/stderr as the bytes arrive, keeping the tail."""
    binary = getattr(sink, "buffer", None)
    fd = source.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        tail.feed(chunk)
        try:
            if binary is not None:
                binary.write(chunk)
                binary.flush()
            else:
                sink.write(chunk.decode("utf-8", "replace"))
                sink.flush()
        except (OSError, ValueError):
            pass  # our own output is gone (closed pipe); keep draining the child
    source.close()


def _terminal_sent_it() -> bool:
    """Whether a SIGINT came from the terminal, which sends it to the child as well."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except (OSError, AttributeError):
        return False


def run_command(command: Sequence[str], tail: LogTail, env: dict[str, str]) -> int:
    """Run ``command`` streaming its output through and feeding ``tail``; forward SIGINT and
    SIGTERM to it. Returns its return code (``-N`` when signal N killed it, as ``subprocess``
    says). Raises ``OSError`` when it cannot be started."""
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, sys.stdout, tail), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, sys.stderr, tail), daemon=True),
    ]
    for pump in pumps:
        pump.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if process.poll() is not None:
            return
        if signum == getattr(signal, "SIGINT", None) and _terminal_sent_it():
            return
        with contextlib.suppress(OSError):  # it exited meanwhile
            process.send_signal(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _FORWARDED:
            previous[signum] = signal.signal(signum, forward)
    try:
        while True:
            try:
                returncode = process.wait()
                break
            except KeyboardInterrupt:  # a handler we did not install; keep waiting
                continue
        for pump in pumps:
            pump.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return returncode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a build or test command and report its outcome, and the Kaizen "
        "completions in the checkout, to the Kaizen server. Exits with the command's code.",
        epilog="Example: kaizen-report --build-failed-codes 2 -- make test",
    )
    parser.add_argument("--url", help="Kaizen server URL (default: $KAIZEN_URL; unset: no report)")
    parser.add_argument("--token", help="a ci token (default: $KAIZEN_TOKEN)")
    parser.add_argument(
        "--build-failed-codes",
        action="append",
        default=[],
        metavar="CODES",
        help="exit codes that mean the build failed, e.g. 2 or 2,4",
    )
    parser.add_argument(
        "--status-map",
        action="append",
        default=[],
        metavar="CODE=STATUS",
        help="map exit codes to run statuses, e.g. 3=error,4=build_failed "
        f"(statuses: {', '.join(RUN_STATUSES)})",
    )
    parser.add_argument("--root", type=Path, help="the checkout (default: git top of the cwd)")
    parser.add_argument(
        "--spool-dir", type=Path, help="default: $KAIZEN_SPOOL_DIR or <root>/.kaizen/spool"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds for sending the report (default 5)"
    )
    parser.add_argument(
        "--explore",
        type=int,
        metavar="N",
        help="when the command runs pytest with pytest-kaizen: explore up to N completions "
        "after its tests (sets $KAIZEN_EXPLORE for it; see pytest-kaizen's README)",
    )
    parser.add_argument(
        "--explore-k", type=int, metavar="K", help="alternatives per explored completion"
    )
    parser.add_argument(
        "--explore-budget", type=float, metavar="SECONDS", help="most time exploring may take"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kaizen-report`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given: kaizen-report [options] -- COMMAND [ARGS...]")
    try:
        status_map = parse_status_map(args.status_map)
        build_failed = _parse_codes(args.build_failed_codes)
    except ValueError as exc:
        parser.error(str(exc))

    settings = settings_from(args.url, args.token)
    run_id = detect_run_id()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # Python children: stream, do not block-buffer
    # One CI run, one id: a pytest-kaizen run inside reports under the same id, and since the
    # server keeps the first report of a run, its per-test attribution wins over ours.
    env["KAIZEN_RUN_ID"] = run_id
    # Exploration runs inside pytest-kaizen, which has the per-test attribution it needs.
    for name, value in (
        ("KAIZEN_EXPLORE", args.explore),
        ("KAIZEN_EXPLORE_K", args.explore_k),
        ("KAIZEN_EXPLORE_BUDGET", args.explore_budget),
    ):
        if value is not None:
            env[name] = str(value)
    # An exploration killed with its guardian may have left a file spliced: put it back before
    # the command builds anything.
    with contextlib.suppress(Exception):
        recover(find_root(args.root or Path.cwd()), warn=_say)

    tail = LogTail()
    started_at = now_iso()
    try:
        returncode = run_command(command, tail, env)  # -N: killed by signal N
    except FileNotFoundError:
        _say(f"{PROG}: command not found: {command[0]}")
        return 127
    except PermissionError:
        _say(f"{PROG}: permission denied: {command[0]}")
        return 126
    except OSError as exc:
        _say(f"{PROG}: cannot run {command[0]}: {exc}")
        return 126
    finished_at = now_iso()
    exit_code = 128 - returncode if returncode < 0 else returncode  # the shell's convention

    if not settings.enabled:
        _say("kaizen: no KAIZEN_URL (or --url) set; nothing reported")
        return exit_code
    try:
        _report(
            args,
            settings.url or "",
            settings.token,
            run_id=run_id,
            status=status_for(returncode, status_map, build_failed),
            started_at=started_at,
            finished_at=finished_at,
            log_tail=tail.text(),
        )
    except Exception as exc:  # reporting must never change the outcome
        _say(f"kaizen: could not report the run: {type(exc).__name__}: {exc}")
    return exit_code


def _report(
    args: argparse.Namespace,
    url: str,
    token: str | None,
    *,
    run_id: str,
    status: str,
    started_at: str,
    finished_at: str,
    log_tail: str,
) -> None:
    warnings: list[str] = []
    client = KaizenClient(url, token, timeout=args.timeout)
    found = collect_completions(args.root or Path.cwd(), client, warn=warnings.append)
    if found.ledger_error:
        warnings.append(
            f"kaizen: could not fetch the ledger ({found.ledger_error}); using the local one only"
        )
    report = build_report(
        run_id=run_id,
        repository=found.repository,
        commit=detect_commit(found.root),
        branch=detect_branch(found.root),
        status=status,
        started_at=started_at,
        finished_at=finished_at,
        log_tail=log_tail,
        completions=attribute(found.located, status),
    )
    spool = Spool(args.spool_dir or spool_dir(found.root))
    delivery = deliver(client, report, spool, budget=args.timeout, warn=warnings.append)
    for line in warnings:
        _say(line)
    if delivery.sent:
        duplicate = " (already reported)" if (delivery.answer or {}).get("duplicate") else ""
        _say(f"kaizen: reported run {run_id}: {summarise(report)}{duplicate}")
        for line in refusal_warnings(delivery.answer):
            _say(line)
    elif delivery.spooled_to is not None:
        _say(f"kaizen: server unreachable, report spooled to {delivery.spooled_to}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
