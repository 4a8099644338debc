"""The results of an exploration re-run, for the process that judges it.

Loaded with ``-p pytest_kaizen.probe`` into the pytest subprocess that runs a completion's tests
against one alternative (:mod:`kaizen_client.explore`); writes what was collected and each
test's folded status to the JSON file named by ``$KAIZEN_EXPLORE_RESULTS``, so the verdict is
read from pytest's own reports rather than from its exit status or output.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

RESULTS_VARIABLE = "KAIZEN_EXPLORE_RESULTS"

_state: dict[str, Any] = {"collected": [], "collection_errors": 0, "tests": {}}


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _state["collection_errors"] += 1


def pytest_collection_finish(session: pytest.Session) -> None:
    _state["collected"] = [item.nodeid for item in session.items]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Fold the phases as the reporter does: a failing call ``failed``, a failing setup or
    teardown ``error``, a skip or xfail ``skipped``, else ``passed``."""
    tests: dict[str, str] = _state["tests"]
    known = tests.get(report.nodeid, "")
    if hasattr(report, "wasxfail"):  # xfail or xpass: no verdict on the code either way
        tests[report.nodeid] = "skipped"
        return
    if report.when == "call":
        if report.failed:
            tests[report.nodeid] = "failed"
        elif report.skipped:
            tests[report.nodeid] = "skipped"
        elif not known:
            tests[report.nodeid] = "passed"
    elif report.failed and known != "failed":
        tests[report.nodeid] = "error"
    elif report.skipped and not known:
        tests[report.nodeid] = "skipped"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(RESULTS_VARIABLE)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({**_state, "exitstatus": int(exitstatus)}, handle)
