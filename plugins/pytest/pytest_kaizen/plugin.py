"""pytest-kaizen: report which Kaizen completions the tests exercised, and how they fared.

Off unless ``--kaizen-url`` or ``$KAIZEN_URL`` is set; then, at the start of the session, the
ledger (the checkout's ``.kaizen/ledger.jsonl`` merged with the server's) is located in the
working tree, each test records which completions' lines it executed, and at the end one
outcome report goes to ``POST /v1/outcomes`` (or to the spool when the server is unreachable).

Nothing here may change the session's outcome: every failure of the plugin is one line of
output, never an exception or a different exit status.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from kaizen_client.client import KaizenClient
from kaizen_client.collect import Completions, collect_completions, settings_from
from kaizen_client.executability import check_untested
from kaizen_client.explore import DEFAULT_BUDGET, DEFAULT_K, MAX_K, explore, recover
from kaizen_client.ledger import Located
from kaizen_client.report import (
    LogTail,
    TestResult,
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

__all__ = ["KaizenReporter", "LineTracer", "run_status"]

POST_BUDGET = 5.0
"""Seconds for sending the report (spooled reports first) at the end of the session."""
PLUGIN_NAME = "kaizen-reporter"
ACTIVE_VARIABLE = "KAIZEN_PYTEST_ACTIVE"
"""Set while a session reports, so that pytest sessions run inside it (pytester, in-process
or in subprocesses) do not report too, under the same run id and before it."""

Key = tuple[str, int]
TraceFunction = Callable[[FrameType, str, Any], Any]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--kaizen-url`` and ``--kaizen-token``."""
    group = parser.getgroup("kaizen", "Kaizen outcome reporting (pytest-kaizen)")
    group.addoption(
        "--kaizen-url",
        default=None,
        metavar="URL",
        help="report completions' outcomes to this Kaizen server (default: $KAIZEN_URL; "
        "unset: the plugin is off)",
    )
    group.addoption(
        "--kaizen-token",
        default=None,
        metavar="TOKEN",
        help="a Kaizen token with the ci role (default: $KAIZEN_TOKEN)",
    )
    group.addoption(
        "--kaizen-explore",
        default=None,
        type=int,
        metavar="N",
        help="after the run, explore up to N completions with a per-test verdict: ask the "
        "server for alternatives, re-run their tests against each, report the verdicts "
        "(default: $KAIZEN_EXPLORE, else 0: off)",
    )
    group.addoption(
        "--kaizen-explore-k",
        default=None,
        type=int,
        metavar="K",
        help=f"alternatives per explored completion, at most {MAX_K} "
        f"(default: $KAIZEN_EXPLORE_K, else {DEFAULT_K})",
    )
    group.addoption(
        "--kaizen-explore-budget",
        default=None,
        type=float,
        metavar="SECONDS",
        help="most time exploration may take, server calls and test runs together "
        f"(default: $KAIZEN_EXPLORE_BUDGET, else {DEFAULT_BUDGET:g})",
    )
    group.addoption(
        "--kaizen-no-executability",
        action="store_true",
        default=False,
        help="do not check the files of completions no test exercised (parse, imports, API "
        "use in this environment) for the report",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the reporter when a server URL is configured; stay silent otherwise."""
    settings = settings_from(config.getoption("kaizen_url"), config.getoption("kaizen_token"))
    if not settings.enabled or hasattr(config, "workerinput"):
        return  # off, or a pytest-xdist worker (the controller reports)
    if os.environ.get(ACTIVE_VARIABLE):
        return  # a pytest session inside a reporting one (pytester): the outer one reports
    try:
        client = KaizenClient(settings.url or "", settings.token, timeout=POST_BUDGET)
    except ValueError as exc:
        _write(config, f"kaizen: {exc}; nothing will be reported")
        return
    os.environ[ACTIVE_VARIABLE] = str(os.getpid())
    config.pluginmanager.register(KaizenReporter(config, client), PLUGIN_NAME)


def _explore_setting(config: pytest.Config, option: str, variable: str, default: float) -> float:
    """An exploration option: the command line, else the environment, else ``default``; a
    malformed environment value counts as unset."""
    value = config.getoption(option)
    if value is not None:
        return float(value)
    try:
        return float(os.environ.get(variable, "").strip() or default)
    except ValueError:
        return default


def _write(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, yellow=True)
    else:
        print(line, file=sys.stderr, flush=True)


def run_status(exitstatus: int, collection_errors: int) -> str:
    """The run's status: ``build_failed`` after collection errors (import or syntax errors in
    the code under test), ``passed`` for exit status 0, ``failed`` when tests failed, ``error``
    otherwise (interrupted, internal or usage error, no tests)."""
    if collection_errors:
        return "build_failed"
    if exitstatus == pytest.ExitCode.OK:
        return "passed"
    if exitstatus == pytest.ExitCode.TESTS_FAILED:
        return "failed"
    return "error"


class LineTracer:
    """Records which completions' lines run while a test runs.

    The global trace function returns a local tracer only for frames whose code lives in a file
    holding a located completion, so other code pays one cheap call per function call and no
    per-line cost.
    """

    def __init__(self, located: list[Located]) -> None:
        self._lines: dict[str, dict[int, tuple[Key, ...]]] = {}
        for item in located:
            lines = self._lines.setdefault(os.path.realpath(item.path), {})
            for number in item.lines:
                lines[number] = (*lines.get(number, ()), item.key)
        self._tracers: dict[str, TraceFunction | None] = {}
        self.hits: set[Key] | None = None

    def _local_for(self, filename: str) -> TraceFunction | None:
        lines = self._lines.get(os.path.realpath(filename))
        if lines is None:
            self._tracers[filename] = None
            return None

        def local(frame: FrameType, event: str, _arg: Any) -> TraceFunction | None:
            if event == "line":
                keys = lines.get(frame.f_lineno)
                hits = self.hits
                if keys and hits is not None:
                    hits.update(keys)
            return local

        self._tracers[filename] = local
        return local

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> TraceFunction | None:
        """``sys.settrace``'s function: trace only frames in completion files."""
        filename = frame.f_code.co_filename
        try:
            local = self._tracers[filename]
        except KeyError:
            local = self._local_for(filename)
        if local is None:
            return None
        local(frame, "line", arg)  # the ``def`` line on a call
        return local

    def start(self) -> bool:
        """Trace the current thread and threads started from now; ``False`` (and nothing
        installed) when another tracer, such as coverage or a debugger, is active."""
        if sys.gettrace() is not None:
            return False
        self.hits = set()
        threading.settrace(self.global_trace)
        sys.settrace(self.global_trace)
        return True

    def stop(self) -> tuple[set[Key], bool]:
        """Uninstall; returns the completions hit and whether tracing stayed undisturbed (a
        debugger started during the test replaces the tracer)."""
        intact = sys.gettrace() == self.global_trace
        if intact:
            sys.settrace(None)
        if _thread_trace() == self.global_trace:
            threading.settrace(None)  # type: ignore[arg-type,unused-ignore]
        hits, self.hits = self.hits or set(), None
        return hits, intact


def _thread_trace() -> Any:
    """``threading.gettrace()`` (3.10+) on every supported Python."""
    gettrace = getattr(threading, "gettrace", None)
    return gettrace() if gettrace is not None else getattr(threading, "_trace_hook", None)


class _TestRecord:
    """One test's phases folded into the protocol's result."""

    def __init__(self, name: str) -> None:
        self.result = TestResult(name=name, status="", duration=0.0)

    @property
    def finished(self) -> bool:
        """Whether the test got a result (an interrupted test has none)."""
        return bool(self.result.status)

    def add(self, report: pytest.TestReport) -> None:
        """Fold in one phase: a failing setup or teardown is an ``error``, a failing call
        ``failed``, a skip in setup or call ``skipped``."""
        result = self.result
        result.duration = (result.duration or 0.0) + max(float(report.duration or 0.0), 0.0)
        if report.when == "call":
            if report.failed:
                result.status, result.message = "failed", _message(report)
            elif report.skipped:
                result.status, result.message = "skipped", _message(report)
            elif not result.status:
                result.status = "passed"
        elif report.failed and result.status != "failed":
            result.status, result.message = "error", _message(report)
        elif report.skipped and not result.status:
            result.status, result.message = "skipped", _message(report)


def _message(report: pytest.TestReport) -> str | None:
    """A short description: the crash line of a failure, the reason of a skip or xfail."""
    wasxfail = getattr(report, "wasxfail", None)
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        reason = str(report.longrepr[2])
        return f"xfail: {wasxfail}" if wasxfail is not None else reason
    if report.skipped and wasxfail is not None:
        return f"xfail: {wasxfail}" if wasxfail else "xfail"
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if isinstance(message, str) and message.strip():
        return message.strip()
    text = report.longreprtext.strip()
    return text.splitlines()[-1] if text else None


class KaizenReporter:
    """The plugin object registered while reporting is on (one per session)."""

    def __init__(self, config: pytest.Config, client: KaizenClient) -> None:
        self.config = config
        self.client = client
        self.found: Completions | None = None
        self.tracer: LineTracer | None = None
        self.attribution_note: str | None = None
        self.started_at = now_iso()
        self.tests: dict[str, _TestRecord] = {}
        self.executed: dict[Key, list[str]] = {}
        self.collection_errors = 0
        self.log = LogTail()
        self.summary: list[str] = []

    # --- session start: the ledger ----------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Load and locate the completions; set up tracing when there are some."""
        self.started_at = now_iso()
        warnings: list[str] = []
        try:
            start = Path(self.config.rootpath)
            # An exploration killed with its guardian left a file spliced: put it back first.
            recover(find_root(start), warn=warnings.append)
            self.found = collect_completions(start, self.client, warn=warnings.append)
        except Exception as exc:  # never break the session
            warnings.append(f"kaizen: could not read the ledger: {type(exc).__name__}: {exc}")
        if self.found is not None and self.found.ledger_error:
            warnings.append(
                f"kaizen: could not fetch the ledger ({self.found.ledger_error}); "
                "going on with the local ledger only"
            )
        for line in warnings:
            _write(self.config, line)
        if self.found is None or not self.found.located:
            return
        if sys.gettrace() is not None:
            self.attribution_note = "another tracer (coverage, a debugger) is active"
            return
        self.tracer = LineTracer(self.found.located)

    # --- per test: attribution and results --------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, Any, None]:
        """Trace the test's setup, call and teardown."""
        tracer = self.tracer
        tracing = tracer.start() if tracer is not None else False
        if tracer is not None and not tracing:
            self.attribution_note = "another tracer (coverage, a debugger) was active"
        try:
            yield
        finally:
            if tracer is not None and tracing:
                hits, intact = tracer.stop()
                if not intact:
                    self.attribution_note = "a debugger or other tracer replaced the tracer"
                for key in hits:
                    self.executed.setdefault(key, []).append(item.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Fold each phase into the test's result; keep failures' text for the log tail."""
        if report.outcome not in ("passed", "failed", "skipped"):
            return  # e.g. pytest-rerunfailures' "rerun"
        if report.when == "setup" or report.nodeid not in self.tests:
            self.tests[report.nodeid] = _TestRecord(report.nodeid)
        self.tests[report.nodeid].add(report)
        if report.failed:
            self._log(f"{report.nodeid} ({report.when})", report.longreprtext, report.sections)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """Count collection errors: they make the run ``build_failed``."""
        if report.failed:
            self.collection_errors += 1
            self._log(f"ERROR collecting {report.nodeid}", report.longreprtext, report.sections)

    def _log(self, title: str, text: str, sections: list[tuple[str, str]]) -> None:
        parts = [f"{'_' * 20} {title} {'_' * 20}\n", text.rstrip() + "\n"]
        for heading, content in sections:
            parts.append(f"{'-' * 10} {heading} {'-' * 10}\n{content.rstrip()}\n")
        self.log.feed("".join(parts).encode("utf-8", "replace"))

    # --- session end: the report ------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Send the report (spooling it when the server is unreachable); never raises."""
        try:
            self._finish(int(exitstatus))
        except Exception as exc:
            self.summary.append(f"kaizen: could not report the run: {type(exc).__name__}: {exc}")
        if self.config.pluginmanager.get_plugin("terminalreporter") is None:
            for line in self.summary:
                print(line, file=sys.stderr, flush=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Stop any tracing left over and clear the nesting guard."""
        if self.tracer is not None and self.tracer.hits is not None:
            self.tracer.stop()
        if os.environ.get(ACTIVE_VARIABLE) == str(os.getpid()):
            del os.environ[ACTIVE_VARIABLE]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Print the summary line(s) after the session's results."""
        for line in self.summary:
            terminalreporter.write_line(line)

    def _finish(self, exitstatus: int) -> None:
        found = self.found
        if found is None:
            return
        if not self.tests and not self.collection_errors:
            self.summary.append("kaizen: no tests ran; nothing reported")
            return
        status = run_status(exitstatus, self.collection_errors)
        results = [record.result for record in self.tests.values() if record.finished]
        statuses = {result.name: result.status for result in results}
        per_test = self.tracer is not None and self.attribution_note is None
        ran = sum(1 for r in results if r.status != "skipped")
        self.log.feed(
            f"{len(results)} tests ({ran} ran), {self.collection_errors} collection errors, "
            f"exit status {exitstatus}: {status}\n".encode()
        )
        attributed = attribute(found.located, status, self.executed if per_test else None, statuses)
        executability = self._executability(found.located, attributed) if per_test else []
        report = build_report(
            run_id=detect_run_id(),
            repository=found.repository,
            commit=detect_commit(found.root),
            branch=detect_branch(found.root),
            status=status,
            started_at=self.started_at,
            finished_at=now_iso(),
            tests=results,
            log_tail=self.log.text(),
            completions=attributed,
            executability=executability,
        )
        warnings: list[str] = []
        delivery = deliver(
            self.client,
            report,
            Spool(spool_dir(found.root)),
            budget=POST_BUDGET,
            warn=warnings.append,
        )
        self.summary.extend(warnings)
        note = f" [run-level status: {self.attribution_note}]" if self.attribution_note else ""
        if delivery.sent:
            duplicate = " (already reported)" if (delivery.answer or {}).get("duplicate") else ""
            self.summary.append(
                f"kaizen: reported run {report['run_id']}: {summarise(report)}{duplicate}{note}"
            )
            self.summary.extend(refusal_warnings(delivery.answer))
        elif delivery.spooled_to is not None:
            self.summary.append(
                f"kaizen: server unreachable, report spooled to {delivery.spooled_to}"
            )
            return  # no server: nothing to explore with
        if per_test and status in ("passed", "failed"):
            self._explore(found, report, attributed, results)

    def _executability(
        self, located: list[Located], attributed: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Completions no test exercised: does their file still parse, import and bind its API
        calls in this environment? Off with ``--kaizen-no-executability``; a failure of the
        check is one line, never the session's."""
        if self.config.getoption("kaizen_no_executability", False):
            return []
        try:
            return check_untested(located, attributed)
        except Exception as exc:  # noqa: BLE001 - the plugin never fails the session
            self.summary.append(f"kaizen: executability check skipped: {exc}")
            return []

    def _explore(
        self,
        found: Completions,
        report: dict[str, Any],
        attributed: list[dict[str, Any]],
        results: list[TestResult],
    ) -> None:
        """CI-side resampling (``kaizen_client.explore``), when asked for; its verdicts go out
        as a run of their own, ``<run id>:explore``, so the main report never waits on it."""
        limit = int(_explore_setting(self.config, "kaizen_explore", "KAIZEN_EXPLORE", 0))
        if limit <= 0:
            return
        k = int(_explore_setting(self.config, "kaizen_explore_k", "KAIZEN_EXPLORE_K", DEFAULT_K))
        budget = _explore_setting(
            self.config, "kaizen_explore_budget", "KAIZEN_EXPLORE_BUDGET", DEFAULT_BUDGET
        )
        explored = explore(
            client=self.client,
            root=found.root,
            rootdir=Path(self.config.rootpath),
            located=found.located,
            attributed=attributed,
            limit=limit,
            k=k,
            budget=budget,
            test_seconds={r.name: r.duration or 0.0 for r in results},
        )
        self.summary.extend(explored.warnings)
        self.summary.append(explored.summary())
        if not explored.completions:
            return
        run_id = f"{report['run_id']}:explore"
        explore_report = build_report(
            run_id=run_id[-256:] if len(run_id) > 256 else run_id,
            repository=found.repository,
            commit=report["commit"],
            branch=report["branch"],
            status=report["status"],
            started_at=report["finished_at"],
            finished_at=now_iso(),
            log_tail=explored.summary() + "\n",
            completions=explored.completions,
        )
        warnings: list[str] = []
        delivery = deliver(
            self.client,
            explore_report,
            Spool(spool_dir(found.root)),
            budget=POST_BUDGET,
            warn=warnings.append,
        )
        self.summary.extend(warnings)
        if delivery.sent:
            self.summary.append(f"kaizen: reported run {run_id}: {summarise(explore_report)}")
            self.summary.extend(refusal_warnings(delivery.answer))
        elif delivery.spooled_to is not None:
            self.summary.append(
                f"kaizen: server unreachable, exploration spooled to {delivery.spooled_to}"
            )
