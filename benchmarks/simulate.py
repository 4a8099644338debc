"""Simulated users: MBPP+ tasks replayed through Kaizen's public HTTP API as an IDE and a CI
would, so the whole feedback loop (completions, events, ledger, outcomes) runs without people.

Run it against a running server (``make serve``) with one token of role ``ide`` and one of
role ``ci`` (``kaizen tokens create --role ide --name sim``, ``... --role ci --name sim``):

    .venv/bin/python benchmarks/simulate.py --ide-token kz_... --ci-token kz_... \\
        --split train --tasks 20 --samples 4 --fix-rate 0.5

(or set ``KAIZEN_IDE_TOKEN`` / ``KAIZEN_CI_TOKEN``; ``--help`` lists every option).

Per task of the split: ``--samples`` fill-in-the-middle requests (``prompt``/``suffix`` of the
task, one seed each, derived from ``--seed``); IDE events ``shown`` then ``accepted`` (any
non-empty completion) or ``rejected`` (an empty one) and a ledger entry per accepted one;
then CI: each accepted completion's program (``task.program(text)`` followed by the task's
asserts) runs in :class:`trainer.sandbox.Sandbox` and is reported as its own CI run
(``passed``, ``failed``, or ``build_failed`` when the program does not compile) with
``test_code`` set to the asserts. Rejected completions are in no file, so no CI run covers
them. With ``--fix-rate P`` a failing completion is, with probability P, edited by the
developer into the task's canonical body (verified in the sandbox first): an ``edited`` event,
the ledger's current text, and a second CI run where it passes (PROTOCOL.md's failure -> fix).

Prints a table and writes JSON to ``benchmarks/results/simulate-<UTC timestamp>.json``.
Other code calls :func:`simulate` (``benchmarks/loop.py`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from trainer.sandbox import RunResult, Sandbox, SandboxLimits
from trainer.tasks import MBPP_SPLITS, Task, load_mbpp, mbpp_path, read_mbpp_rows

__all__ = [
    "CompletionRow",
    "SimulationError",
    "SimulationResult",
    "canonical_fixes",
    "default_data_path",
    "main",
    "simulate",
]

log = logging.getLogger("benchmarks.simulate")

# MBPP+ ships with the product (trainer/data/); KAIZEN_MBPP_PATH only overrides it.
DEFAULT_DATA = mbpp_path()
DEFAULT_URL = "http://127.0.0.1:8000"
READY_TIMEOUT_S = 900.0  # how long to wait for an engine that is still loading
TRANSIENT_ATTEMPTS = 5  # tries for connection errors and 502/504 answers
UNKNOWN_ATTEMPTS = 3  # tries for events/ledger the server answers 404 unknown_completion
LOG_TAIL = 4096


class SimulationError(RuntimeError):
    """The simulation cannot go on (a refused token, an unknown model, a wrong URL); the
    message says what to do."""


class _RequestFailed(Exception):
    """One request failed for good; counted as an error, the simulation goes on."""


@dataclass
class CompletionRow:
    """One completion the simulated IDE asked for and what became of it.

    ``status``: ``passed`` / ``failed`` / ``build_failed`` (the CI verdict as reported),
    ``rejected`` (empty; no CI run), ``error`` (the verdict could not be had or reported).
    ``fixed``: the developer then edited it into the canonical body, reported as passing.
    """

    completion_id: str
    task_id: str
    sample: int
    seed: int
    status: str
    fixed: bool = False


@dataclass
class SimulationResult:
    """Counts over the run and one row per completion. ``passed``/``failed``/``build_failed``
    are first verdicts (the model's own text); fixes are counted apart in ``fixed``."""

    model: str
    tasks: int
    requests: int  # completion requests sent
    recorded: int  # requests answered with a completion id
    accepted: int
    rejected: int
    passed: int
    failed: int
    build_failed: int
    fixed: int
    errors: int
    wall_s: float
    rows: list[CompletionRow] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)  # the first few, for the log

    @property
    def pass_rate(self) -> float | None:
        """Passed over completions with a verdict (passed + failed + build_failed)."""
        judged = self.passed + self.failed + self.build_failed
        return self.passed / judged if judged else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass_rate"] = self.pass_rate
        return out


@dataclass(frozen=True)
class _Config:
    url: str
    ide_token: str
    ci_token: str
    model: str
    samples: int
    temperature: float
    max_tokens: int
    seed: int
    concurrency: int
    repository: str
    fix_rate: float


# ------------------------------------------------------------------------------ tasks


def default_data_path() -> Path:
    """The MBPP+ file: ``KAIZEN_MBPP_PATH``, else the copy bundled in ``trainer/data/``."""
    return Path(os.environ.get("KAIZEN_MBPP_PATH") or DEFAULT_DATA)


def _reindent(lines: list[str]) -> list[str]:
    """Lines of a function body re-indented so that one level is four spaces."""
    code = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    unit = code[0][: len(code[0]) - len(code[0].lstrip())] if code else ""
    if unit in ("", "    "):
        return lines
    out = []
    for line in lines:
        depth, rest = 0, line
        while rest.startswith(unit):
            rest, depth = rest[len(unit) :], depth + 1
        out.append("    " * depth + rest if line.strip() else "")
    return out


def canonical_fixes(path: str | Path) -> dict[str, str]:
    """Task id -> the developer's fix: the lines of the canonical solution after the entry
    point's ``def`` line, re-indented to four spaces (the text between a task's prompt and
    suffix, as :func:`trainer.tasks.load_mbpp` cuts them). Not yet checked to pass."""
    fixes: dict[str, str] = {}
    for row in read_mbpp_rows(path):
        lines = str(row["canonical_solution"]).strip("\n").split("\n")
        pattern = re.compile(rf"^def\s+{re.escape(str(row['entry_point']))}\s*\(")
        index = next((i for i, text in enumerate(lines) if pattern.match(text)), None)
        if index is None:
            continue
        body = [text.rstrip() for text in _reindent(lines[index + 1 :])]
        text = "\n".join(body).strip("\n")
        if text.strip():
            fixes[str(row["task_id"])] = text
    return fixes


def _slug(task_id: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", task_id).strip("_").lower() or "task"


def _request_seed(seed: int, task_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{task_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _compiles(program: str) -> bool:
    """Whether the program is valid Python. Compiling runs nothing of it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(program, "main.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat()


# ------------------------------------------------------------------------------ HTTP


class _Api:
    """Kaizen's public API with retries; turns refusals into errors that say what to do."""

    def __init__(self, client: httpx.AsyncClient, url: str, tokens: Mapping[str, str]) -> None:
        self.client = client
        self.url = url
        self.tokens = tokens

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        unreachable_deadline = time.monotonic() + 10.0  # a server that is still binding
        said = False
        while True:
            try:
                response = await self.client.get("/readyz")
                if response.status_code == 200:
                    return
            except httpx.TransportError as exc:
                if time.monotonic() > unreachable_deadline:
                    raise SimulationError(
                        f"cannot reach Kaizen at {self.url} ({exc!r}): start it with "
                        "`make serve` or pass its address with --url"
                    ) from exc
            if time.monotonic() > deadline:
                raise SimulationError(f"{self.url} was not ready after {timeout:.0f} s")
            if not said:
                log.info("event=waiting_for_engine url=%s", self.url)
                said = True
            await asyncio.sleep(2.0)

    async def call(
        self, method: str, path: str, role: str, *, what: str, **kwargs: Any
    ) -> dict[str, Any]:
        """The JSON answer of one request. Raises SimulationError for what a retry cannot
        mend, _RequestFailed for a request that failed for good."""
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        transient = unknown = 0
        ready_deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                response = await self.client.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                transient += 1
                if transient >= TRANSIENT_ATTEMPTS:
                    raise _RequestFailed(f"{what}: {exc!r}") from exc
                await asyncio.sleep(0.5 * 2**transient)
                continue
            status = response.status_code
            if status == 200:
                return dict(response.json())
            error = _error_of(response)
            code = error.get("code")
            message = error.get("message") or response.text[:300]
            if status == 503 and time.monotonic() < ready_deadline:
                retry_after = _float(response.headers.get("retry-after"), 2.0)
                await asyncio.sleep(min(max(retry_after, 0.5), 30.0))
                continue
            if status in (502, 504) and transient + 1 < TRANSIENT_ATTEMPTS:
                transient += 1
                await asyncio.sleep(0.5 * 2**transient)
                continue
            if status == 401:
                raise SimulationError(
                    f"{what}: the {role} token was refused ({message}). Create one with "
                    f"`kaizen tokens create --role {role} --name sim` and pass it with "
                    f"--{role}-token or KAIZEN_{role.upper()}_TOKEN."
                )
            if status == 403:
                raise SimulationError(
                    f"{what}: the token given as the {role} token has another role ({message}). "
                    f"Pass a token of role {role} (`kaizen tokens create --role {role} "
                    f"--name sim`) with --{role}-token or KAIZEN_{role.upper()}_TOKEN."
                )
            if status == 404 and code == "model_not_found":
                raise SimulationError(
                    f"{what}: {message} Pick one with --model (or leave --model out: the "
                    "first model of GET /v1/models)."
                )
            if status == 404 and code == "unknown_completion":
                # Another replica may not have written the record yet (PROTOCOL.md): again.
                unknown += 1
                if unknown >= UNKNOWN_ATTEMPTS:
                    raise _RequestFailed(f"{what}: {message}")
                await asyncio.sleep(0.5 * unknown)
                continue
            if status == 404:
                raise SimulationError(
                    f"{what}: {method} {self.url}{path} does not exist ({message}). Is --url "
                    "the address of a Kaizen server (e.g. http://127.0.0.1:8000)?"
                )
            raise _RequestFailed(f"{what}: HTTP {status}: {message}")


def _error_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


# ------------------------------------------------------------------------------ one task


class _Run:
    """The state of one simulation: configuration, API, sandbox lane and counters."""

    def __init__(
        self,
        config: _Config,
        api: _Api,
        sandbox: Sandbox,
        fixes: Mapping[str, str],
        bar: tqdm[Any],
    ) -> None:
        self.config = config
        self.api = api
        self.sandbox = sandbox
        self.fixes = fixes
        self.bar = bar
        self.requests = asyncio.Semaphore(config.concurrency)
        # Tasks in flight: enough that completions keep coming while others are in the sandbox.
        self.in_flight = asyncio.Semaphore(2 * config.concurrency)
        # One sandbox batch at a time: the sandbox runs its own `workers` threads per batch.
        self.lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulate-sandbox")
        self.rows: list[CompletionRow] = []
        self.sent = 0
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        log.warning("event=simulate_error %s", message)
        self.errors.append(message)

    async def run_programs(self, programs: Sequence[tuple[str, str]]) -> list[RunResult]:
        """Judge (code, test) pairs: the sandbox puts the test after the code and seals it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.lane, self.sandbox.run_tests, list(programs))

    async def task(self, task: Task) -> None:
        async with self.in_flight:
            await self._task(task)
            self.bar.update(1)
            self.bar.set_postfix(self._postfix(), refresh=False)

    def _postfix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return {k: counts.get(k, 0) for k in ("passed", "failed", "build_failed")}

    async def _task(self, task: Task) -> None:
        c = self.config
        file_path = f"tasks/{_slug(task.task_id)}.py"
        seeds = [_request_seed(c.seed, task.task_id, k) for k in range(c.samples)]
        answers = await asyncio.gather(*(self._complete(task, file_path, s) for s in seeds))
        served: list[tuple[CompletionRow, str]] = []
        for k, answer in enumerate(answers):
            if answer is not None:
                completion_id, text = answer
                served.append((CompletionRow(completion_id, task.task_id, k, seeds[k], ""), text))
        if not served:
            return
        self.rows.extend(row for row, _ in served)

        events: list[dict[str, Any]] = []
        ledger: list[dict[str, Any]] = []
        for row, text in served:
            kind = "accepted" if text else "rejected"
            events += [_event(row.completion_id, "shown"), _event(row.completion_id, kind)]
            if text:
                ledger.append(_ledger(row.completion_id, c.repository, file_path, task, text))
            else:
                row.status = "rejected"
        await self._post_ide("POST", "/v1/events", {"events": events}, "events")
        if ledger:
            await self._post_ide("PUT", "/v1/ledger", {"entries": ledger}, "ledger")

        accepted = [(row, text) for row, text in served if text]
        if not accepted:
            return
        started = _now()
        programs = [task.program(text) for _, text in accepted]
        compiles = [_compiles(p) for p in programs]
        to_run = [(p, task.test) for p, ok in zip(programs, compiles, strict=True) if ok]
        ran = iter(await self.run_programs(to_run) if to_run else [])
        for (row, text), ok in zip(accepted, compiles, strict=True):
            result = next(ran) if ok else None
            status = _verdict(result)
            reported = await self._report(
                task, row, file_path, text, status, result, started=started
            )
            row.status = status if reported else "error"
            if status == "error" and result is not None:
                self.error(f"{task.task_id}: sandbox: {result.reason}")

        failing = [
            (row, text)
            for row, text in accepted
            if row.status in ("failed", "build_failed")
            and task.task_id in self.fixes
            and random.Random(f"{c.seed}:fix:{task.task_id}:{row.sample}").random() < c.fix_rate
        ]
        if failing:
            await self._fix(task, file_path, failing)

    async def _complete(self, task: Task, file_path: str, seed: int) -> tuple[str, str] | None:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "prompt": task.prompt,
            "suffix": task.suffix,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "seed": seed,
            "context": {
                "language": "python",
                "file_path": file_path,
                "repository": c.repository,
            },
        }
        if task.single_line:
            body["single_line"] = True
        async with self.requests:
            self.sent += 1
            try:
                answer = await self.api.call(
                    "POST", "/v1/completions", "ide", what="completion", json=body
                )
            except _RequestFailed as exc:
                self.error(f"{task.task_id}: {exc}")
                return None
        return str(answer["id"]), str(answer["choices"][0]["text"])

    async def _post_ide(self, method: str, path: str, body: dict[str, Any], what: str) -> None:
        try:
            await self.api.call(method, path, "ide", what=what, json=body)
        except _RequestFailed as exc:
            self.error(str(exc))

    async def _report(
        self,
        task: Task,
        row: CompletionRow,
        file_path: str,
        text: str,
        status: str,
        result: RunResult | None,
        *,
        started: str,
    ) -> bool:
        """One CI run covering one completion; True when the server attributed it."""
        c = self.config
        test_status = {"passed": "passed", "failed": "failed"}.get(status, "error")
        if result is None:
            message, log_tail, duration = "the program does not compile", "", None
        else:
            message = result.reason if status != "passed" else None
            log_tail = (result.stdout + result.stderr)[-LOG_TAIL:]
            duration = round(result.duration_s, 4)
        test_name = f"{file_path}::test_{_slug(task.task_id)}"
        report = {
            "run_id": f"sim:{uuid.uuid4()}",
            "repository": c.repository,
            "commit": "sim",
            "status": status,
            "started_at": started,
            "finished_at": _now(),
            "tests": [
                {"name": test_name, "status": test_status, "duration": duration, "message": message}
            ],
            "log_tail": log_tail,
            "completions": [
                {
                    "completion_id": row.completion_id,
                    "choice_index": 0,
                    "file_path": file_path,
                    "final_text": text,
                    "status": status,
                    "tests": [test_name],
                    "test_code": task.test,
                }
            ],
        }
        try:
            answer = await self.api.call("POST", "/v1/outcomes", "ci", what="outcome", json=report)
        except _RequestFailed as exc:
            self.error(f"{task.task_id}: {exc}")
            return False
        if answer.get("unknown_completion_ids"):
            self.error(f"{task.task_id}: outcome names an unknown completion {row.completion_id}")
            return False
        return True

    async def _fix(
        self, task: Task, file_path: str, failing: list[tuple[CompletionRow, str]]
    ) -> None:
        """The developer edits failing completions into the canonical body and CI passes."""
        fix = self.fixes[task.task_id]
        started = _now()
        (check,) = await self.run_programs([(task.program(fix), task.test)])
        if not check.passed:
            log.info("event=fix_skipped task=%s reason=%r", task.task_id, check.reason)
            return
        events = [_event(row.completion_id, "edited", text=fix) for row, _ in failing]
        entries = [
            _ledger(row.completion_id, self.config.repository, file_path, task, text, current=fix)
            for row, text in failing
        ]
        await self._post_ide("POST", "/v1/events", {"events": events}, "events")
        await self._post_ide("PUT", "/v1/ledger", {"entries": entries}, "ledger")
        for row, _ in failing:
            if await self._report(task, row, file_path, fix, "passed", check, started=started):
                row.fixed = True


def _verdict(result: RunResult | None) -> str:
    if result is None:
        return "build_failed"
    if result.passed:
        return "passed"
    # "error": the sandbox could not run the program, which says nothing about the code.
    return "error" if result.status == "error" else "failed"


def _event(completion_id: str, kind: str, *, text: str | None = None) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "completion_id": completion_id,
        "choice_index": 0,
        "type": kind,
        "timestamp": _now(),
        "text": text,
    }


def _ledger(
    completion_id: str,
    repository: str,
    file_path: str,
    task: Task,
    text: str,
    *,
    current: str | None = None,
) -> dict[str, Any]:
    return {
        "completion_id": completion_id,
        "choice_index": 0,
        "repository": repository,
        "file_path": file_path,
        "inserted_text": text,
        "current_text": text if current is None else current,
        "start_offset": len(task.prompt),
        "state": "active",
        "updated_at": _now(),
    }


# ------------------------------------------------------------------------------ the run


async def _simulate(
    config: _Config,
    tasks: Sequence[Task],
    sandbox: Sandbox,
    fixes: Mapping[str, str],
    progress: bool,
) -> SimulationResult:
    start = time.monotonic()
    limits = httpx.Limits(max_connections=3 * config.concurrency + 4)
    timeout = httpx.Timeout(connect=30.0, read=900.0, write=60.0, pool=None)
    async with httpx.AsyncClient(
        base_url=config.url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        api = _Api(client, config.url, {"ide": config.ide_token, "ci": config.ci_token})
        await api.wait_ready()
        model = config.model
        if not model:
            listed = await api.call("GET", "/v1/models", "ide", what="listing models")
            if not listed.get("data"):
                raise SimulationError(f"{config.url}/v1/models lists no model")
            model = str(listed["data"][0]["id"])
        config = _Config(**{**asdict(config), "model": model})
        # Check the CI token before any completion is asked for.
        await api.call(
            "GET",
            "/v1/ledger",
            "ci",
            what="checking the ci token",
            params={"repository": config.repository},
        )
        log.info(
            "event=simulate_start url=%s model=%s tasks=%d samples=%d concurrency=%d",
            config.url,
            model,
            len(tasks),
            config.samples,
            config.concurrency,
        )
        with tqdm(total=len(tasks), desc="simulate", unit="task", disable=not progress) as bar:
            run = _Run(config, api, sandbox, fixes, bar)
            try:
                async with asyncio.TaskGroup() as group:
                    for task in tasks:
                        group.create_task(run.task(task))
            except BaseExceptionGroup as group:  # the first SimulationError says it best
                errors = group.exceptions
                raise next(
                    (e for e in errors if isinstance(e, SimulationError)), errors[0]
                ) from None
            finally:
                run.lane.shutdown(wait=True, cancel_futures=True)

    order = {task.task_id: i for i, task in enumerate(tasks)}
    rows = sorted(run.rows, key=lambda r: (order.get(r.task_id, 0), r.sample))
    count = {s: sum(1 for r in rows if r.status == s) for s in ("passed", "failed", "build_failed")}
    rejected = sum(1 for r in rows if r.status == "rejected")
    errors = len(run.errors)
    result = SimulationResult(
        model=model,
        tasks=len(tasks),
        requests=run.sent,
        recorded=len(rows),
        accepted=len(rows) - rejected,
        rejected=rejected,
        passed=count["passed"],
        failed=count["failed"],
        build_failed=count["build_failed"],
        fixed=sum(1 for r in rows if r.fixed),
        errors=errors,
        wall_s=round(time.monotonic() - start, 3),
        rows=rows,
        error_messages=run.errors[:20],
    )
    log.info(
        "event=simulate_done requests=%d recorded=%d passed=%d failed=%d build_failed=%d "
        "fixed=%d errors=%d wall_s=%.1f",
        result.requests,
        result.recorded,
        result.passed,
        result.failed,
        result.build_failed,
        result.fixed,
        result.errors,
        result.wall_s,
    )
    return result


def simulate(
    *,
    url: str,
    ide_token: str,
    ci_token: str,
    tasks: Sequence[Task],
    samples: int,
    temperature: float,
    max_tokens: int,
    seed: int,
    concurrency: int,
    repository: str,
    fix_rate: float,
    sandbox: Sandbox,
    model: str | None = None,
    progress: bool = True,
    fixes: Mapping[str, str] | None = None,
) -> SimulationResult:
    """Replay ``tasks`` through Kaizen at ``url`` as an IDE and a CI (see the module docstring).

    ``model``: None for the first model of ``GET /v1/models``. ``fixes``: task id -> the text
    a developer fixes a failing completion into; None reads the canonical bodies from
    :func:`default_data_path` when ``fix_rate`` > 0. Blocking (runs its own event loop); raises
    :class:`SimulationError` when it cannot go on; other failures are counted in ``errors``.
    """
    if samples < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError("samples, concurrency and max_tokens must be at least 1")
    if not 0.0 <= fix_rate <= 1.0:
        raise ValueError(f"fix_rate must be between 0 and 1: {fix_rate}")
    if fixes is None and fix_rate > 0:
        data = default_data_path()
        if not data.is_file():
            raise SimulationError(
                f"fix_rate > 0 needs the canonical solutions, and there is no MBPP+ file at "
                f"{data}: set KAIZEN_MBPP_PATH or pass fixes=canonical_fixes(path)"
            )
        fixes = canonical_fixes(data)
    config = _Config(
        url=url.rstrip("/"),
        ide_token=ide_token,
        ci_token=ci_token,
        model=model or "",
        samples=samples,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        concurrency=concurrency,
        repository=repository,
        fix_rate=fix_rate,
    )
    return asyncio.run(_simulate(config, tasks, sandbox, fixes or {}, progress))


# ------------------------------------------------------------------------------ the script


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(result: SimulationResult) -> None:
    rows = [
        ("model", result.model),
        ("tasks", str(result.tasks)),
        ("requests", str(result.requests)),
        ("completions recorded", str(result.recorded)),
        ("accepted", str(result.accepted)),
        ("rejected (empty)", str(result.rejected)),
        ("passed", str(result.passed)),
        ("failed", str(result.failed)),
        ("build_failed", str(result.build_failed)),
        ("fixed", str(result.fixed)),
        ("pass rate", _fmt(result.pass_rate)),
        ("errors", str(result.errors)),
        ("wall time s", _fmt(result.wall_s, 1)),
    ]
    width = max(len(name) for name, _ in rows)
    print("Simulated users")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Replay MBPP+ tasks through Kaizen as simulated IDE users and CI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default=DEFAULT_URL, help="Kaizen's address")
    p.add_argument("--ide-token", default=None, help="a token of role ide; else $KAIZEN_IDE_TOKEN")
    p.add_argument("--ci-token", default=None, help="a token of role ci; else $KAIZEN_CI_TOKEN")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="MBPP+ jsonl; else $KAIZEN_MBPP_PATH or the shared copy",
    )
    p.add_argument("--split", choices=list(MBPP_SPLITS), default="train")
    p.add_argument("--tasks", type=int, default=None, help="only the first N tasks of the split")
    p.add_argument("--samples", type=int, default=4, help="requests per task")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--seed", type=int, default=0, help="request seeds and fixes derive from it")
    p.add_argument("--model", default=None, help="default: the first model of GET /v1/models")
    p.add_argument("--concurrency", type=int, default=4, help="completion requests in flight")
    p.add_argument("--repository", default="sim/mbpp")
    p.add_argument("--fix-rate", type=float, default=0.0, help="P(a failing one gets fixed)")
    p.add_argument("--sandbox-workers", type=int, default=2, help="programs run at once")
    p.add_argument("--sandbox-timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path; else benchmarks/results/simulate-<UTC timestamp>.json",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ide_token = args.ide_token or os.environ.get("KAIZEN_IDE_TOKEN")
    ci_token = args.ci_token or os.environ.get("KAIZEN_CI_TOKEN")
    for role, token in (("ide", ide_token), ("ci", ci_token)):
        if not token:
            print(
                f"error: no {role} token: pass --{role}-token or set KAIZEN_{role.upper()}_TOKEN "
                f"(create one with `kaizen tokens create --role {role} --name sim`)",
                file=sys.stderr,
            )
            return 2
    data = args.data or default_data_path()
    if not data.is_file():
        print(
            f"error: no MBPP+ file at {data}: pass --data or set KAIZEN_MBPP_PATH", file=sys.stderr
        )
        return 2
    tasks = load_mbpp(data, args.split)
    if args.tasks is not None:
        tasks = tasks[: args.tasks]
    fixes = canonical_fixes(data) if args.fix_rate > 0 else {}
    sandbox = Sandbox(
        SandboxLimits(timeout_s=args.sandbox_timeout, cpu_s=max(1, round(args.sandbox_timeout))),
        workers=args.sandbox_workers,
    )
    assert ide_token and ci_token
    try:
        result = simulate(
            url=args.url,
            ide_token=ide_token,
            ci_token=ci_token,
            tasks=tasks,
            samples=args.samples,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=args.seed,
            concurrency=args.concurrency,
            repository=args.repository,
            fix_rate=args.fix_rate,
            sandbox=sandbox,
            model=args.model,
            progress=not args.no_progress,
            fixes=fixes,
        )
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    payload = {
        "benchmark": "simulate",
        "config": {
            "url": args.url,
            "data": str(data),
            "split": args.split,
            "tasks": len(tasks),
            "samples": args.samples,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "model": result.model,
            "concurrency": args.concurrency,
            "repository": args.repository,
            "fix_rate": args.fix_rate,
            "sandbox": {
                "workers": args.sandbox_workers,
                "timeout_s": args.sandbox_timeout,
                "network_isolated": sandbox.network_isolated,
            },
        },
        "summary": {k: v for k, v in result.to_dict().items() if k != "rows"},
        "rows": [asdict(row) for row in result.rows],
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        path = args.out
    else:
        path = write_results("simulate", payload)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
