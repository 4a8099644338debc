"""Simulated users against the real app under uvicorn with a scripted engine: every accepted
completion gets exactly one CI verdict of the right status (a fixed one two: failed, then
passed with the canonical body), events and ledger are stored, a wrong token is a clear error."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.simulate import (
    SimulationError,
    SimulationResult,
    canonical_fixes,
    default_data_path,
    simulate,
)
from server.app import create_app
from server.config import Settings
from server.store.models import Completion, CompletionEvent, LedgerEntry
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import RunningServer, live_server
from trainer.records import load_outcome_records
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.tasks import Task, load_mbpp

DATA = default_data_path()

WRONG = "    raise RuntimeError('a wrong answer')"
BROKEN = "    return ("  # does not compile
# What the scripted model writes for each of five tasks, and the status CI should report.
PLAN = ("good", "wrong", "broken", "empty", "fixme")
EXPECTED = {"good": "passed", "wrong": "failed", "broken": "build_failed", "fixme": "failed"}
# Each PLAN entry's task, and the canonical bodies by task id.
Cases = tuple[dict[str, Task], dict[str, str]]


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=30.0, cpu_s=30))


@pytest.fixture(scope="module")
def cases() -> Cases:
    """Five train tasks (one per PLAN entry) whose canonical body is a single line, so the
    server's blank-line stop never cuts it; and the canonical bodies by task id."""
    fixes = canonical_fixes(DATA)
    tasks = [t for t in load_mbpp(DATA, "train") if "\n" not in fixes.get(t.task_id, "\n")]
    return dict(zip(PLAN, tasks[: len(PLAN)], strict=True)), fixes


def _engine(by_role: dict[str, Task], fixes: dict[str, str]) -> FakeEngine:
    texts = {
        "good": lambda t: fixes[t.task_id],
        "wrong": lambda t: WRONG,
        "broken": lambda t: BROKEN,
        "empty": lambda t: "",
        "fixme": lambda t: WRONG,
    }

    def reply(prompt: str, adapter: str | None, index: int) -> str:
        for role, task in by_role.items():
            if task.prompt in prompt:
                return texts[role](task)
        raise AssertionError(f"unexpected prompt {prompt[:80]!r}")

    return FakeEngine(reply=reply, max_model_len=8192)


@pytest.fixture
def server(settings: Settings, cases: Cases) -> Iterator[RunningServer]:
    by_role, fixes = cases
    with live_server(create_app(settings, engine=_engine(by_role, fixes))) as running:
        yield running


def _run(
    server: RunningServer,
    tokens: dict[str, str],
    sandbox: Sandbox,
    tasks: list[Task],
    fixes: dict[str, str],
    **overrides: object,
) -> SimulationResult:
    kwargs: dict[str, object] = {
        "url": server.url,
        "ide_token": tokens["ide"],
        "ci_token": tokens["ci"],
        "tasks": tasks,
        "samples": 2,
        "temperature": 0.8,
        "max_tokens": 384,
        "seed": 7,
        "concurrency": 3,
        "repository": "sim/mbpp",
        "fix_rate": 1.0,
        "sandbox": sandbox,
        "progress": False,
        "fixes": fixes,
        **overrides,
    }
    return simulate(**kwargs)  # type: ignore[arg-type]


def test_simulated_users_leave_the_whole_feedback_trail(
    server: RunningServer,
    tokens: dict[str, str],
    session_factory: sessionmaker[Session],
    sandbox: Sandbox,
    cases: Cases,
) -> None:
    by_role, fixes = cases
    role_of = {task.task_id: role for role, task in by_role.items()}
    fixme = by_role["fixme"]
    # Only the "fixme" task has a fix on offer: "wrong" and "broken" stay failed.
    result = _run(
        server, tokens, sandbox, list(by_role.values()), {fixme.task_id: fixes[fixme.task_id]}
    )

    assert (result.tasks, result.requests, result.recorded) == (5, 10, 10)
    assert (result.accepted, result.rejected, result.errors) == (8, 2, 0), result.error_messages
    assert (result.passed, result.failed, result.build_failed, result.fixed) == (2, 4, 2, 2)
    assert result.pass_rate == pytest.approx(2 / 8)
    assert result.model == "fake-model"
    for row in result.rows:
        role = role_of[row.task_id]
        assert row.status == EXPECTED.get(role, "rejected")
        assert row.fixed == (role == "fixme")
    assert len({row.seed for row in result.rows}) == 10

    with session_factory() as session:
        records = load_outcome_records(session=session)
        completions = {c.id: c for c in session.scalars(select(Completion))}
        events = list(session.scalars(select(CompletionEvent)))
        ledger = {e.completion_id: e for e in session.scalars(select(LedgerEntry))}

    by_completion = defaultdict(list)
    for record in records:
        by_completion[record.completion_id].append(record)
    for row in result.rows:
        role, task = role_of[row.task_id], by_role[role_of[row.task_id]]
        completion = completions[row.completion_id]
        assert completion.prompt == task.prompt and completion.suffix == task.suffix
        assert completion.params["seed"] == row.seed
        assert (completion.language, completion.repository) == ("python", "sim/mbpp")
        assert completion.file_path == f"tasks/{task.task_id.lower().replace('/', '_')}.py"
        kinds = sorted(e.type for e in events if e.completion_id == row.completion_id)
        outcomes = by_completion[row.completion_id]
        if role == "empty":
            assert kinds == ["rejected", "shown"]
            assert outcomes == [] and row.completion_id not in ledger
            continue
        assert all(o.test_code == task.test for o in outcomes)
        assert all(o.repository == "sim/mbpp" for o in outcomes)
        if role == "fixme":
            failed, passed = outcomes
            assert (failed.status, failed.final_text) == ("failed", WRONG)
            assert failed.fixed_text == fixes[task.task_id]
            assert (passed.status, passed.final_text) == ("passed", fixes[task.task_id])
            assert kinds == ["accepted", "edited", "shown"]
            assert ledger[row.completion_id].current_text == fixes[task.task_id]
        else:
            (outcome,) = outcomes
            assert outcome.status == EXPECTED[role] and outcome.fixed_text is None
            assert outcome.final_text == outcome.completion_text
            assert kinds == ["accepted", "shown"]
            assert ledger[row.completion_id].current_text == outcome.final_text
        assert ledger[row.completion_id].inserted_text == completion.choices[0].text
    assert len(records) == 8 + 2


def test_a_wrong_token_is_a_clear_error(
    server: RunningServer, tokens: dict[str, str], sandbox: Sandbox, cases: Cases
) -> None:
    by_role, fixes = cases
    tasks = list(by_role.values())[:1]
    with pytest.raises(SimulationError, match="ide token was refused") as refused:
        _run(server, {**tokens, "ide": "kz_not-a-token"}, sandbox, tasks, fixes)
    assert "kaizen tokens create --role ide" in str(refused.value)
    assert "KAIZEN_IDE_TOKEN" in str(refused.value)
    with pytest.raises(SimulationError, match="has another role") as wrong_role:
        _run(server, {**tokens, "ci": tokens["ide"]}, sandbox, tasks, fixes)
    assert "--ci-token" in str(wrong_role.value)
    with pytest.raises(SimulationError, match="does not exist"):
        _run(server, tokens, sandbox, tasks, fixes, model="no-such-model")
