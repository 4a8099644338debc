"""Executability of self-contained programs, checked in the sandbox: the trainer's side of the
check that the CI plugin runs in a project's own environment.

The check itself is the plugin's (:mod:`kaizen_client.executability`, standard library only):
its source goes into the run's directory beside the program, and the sandbox runs it there, so
imports resolve (and the program runs) under the sandbox's limits and isolation, never in the
trainer's process. A program that a sealed test verdict passed is executable by that verdict:
executability is for what no test judged, and never stands in for a verdict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kaizen_client import executability as checker
from kaizen_client.executability import Executability

from trainer.sandbox import RunResult, Sandbox

__all__ = ["Executability", "check_programs", "executability_rate", "from_run"]

log = logging.getLogger(__name__)

_CHECKER_FILE = "kaizen_executability.py"
_PROGRAM_FILE = "candidate.py"
_CHECKER_SOURCE = Path(checker.__file__).read_text(encoding="utf-8")
# main.py: the checker, run on the candidate; the last JSON line it prints is the result.
_DRIVER = (
    "import sys\n"
    "sys.path.insert(0, '.')\n"
    f"import {Path(_CHECKER_FILE).stem} as check\n"
    f"sys.exit(check.main([{_PROGRAM_FILE!r}{{run}}]))\n"
)
_INCONCLUSIVE = frozenset({"timeout", "memory", "output_limit", "killed"})


def from_run(result: RunResult) -> Executability:
    """The checker's verdict from one sandbox run: its last JSON line. A run that ended before
    the final line (the program hung, blew its memory, or killed its process) keeps the static
    result with ``runs`` False for a crash and None for a limit (inconclusive)."""
    found: Executability | None = None
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    for line in reversed(lines):
        try:
            found = Executability.from_json(json.loads(line))
            break
        except (ValueError, KeyError, TypeError):
            continue
    if found is None:
        return Executability(parses=False, problems=[f"checker gave no result: {result.reason}"])
    if found.runs is None and found.executable and result.status != "passed":
        # The static line came, the final one did not: the run itself ended the process.
        found.runs = None if result.status in _INCONCLUSIVE else False
        found.problems.append(f"run ended: {result.reason}"[:500])
    return found


def check_programs(
    programs: Sequence[str], *, sandbox: Sandbox, run: bool = True
) -> list[Executability]:
    """The executability of each program (in input order), each checked in its own sandbox run;
    with ``run`` a program that passes the static check is also run (``runs``)."""
    driver = _DRIVER.format(run=", '--run'" if run else "")

    def one(program: str) -> Executability:
        files = {_CHECKER_FILE: _CHECKER_SOURCE, _PROGRAM_FILE: program}
        return from_run(sandbox.run_python(driver, files=files))

    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=sandbox.workers) as pool:
        results = list(pool.map(one, programs))
    log.info(
        "event=executability_checked programs=%d executable=%d",
        len(results),
        sum(r.executable for r in results),
    )
    return results


def executability_rate(values: Sequence[bool | None]) -> float | None:
    """Share of executable ones among those checked (None: not checked); None if none was."""
    checked = [v for v in values if v is not None]
    return sum(checked) / len(checked) if checked else None
