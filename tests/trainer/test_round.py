"""Training rounds on the tiny model against a real (migrated SQLite) database: records become
pairs, pairs a candidate adapter in the registry with its manifest; the funnel, metrics and
timings land on the round's row; dry runs and skipped rounds store nothing; a non-finite round
keeps the active adapter; a killed round resumes; the worker's schedule and lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store import rounds as round_store
from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.feedback import save_outcome
from server.store.models import TrainingRound
from server.store.rollout import set_rollout_state
from tests.trainer.test_train import _config as tiny_config
from tests.utils.tiny_model import build_tiny_model
from trainer.config import TrainConfig
from trainer.lock import RoundBusyError, round_lock
from trainer.round import RoundOptions, run_round
from trainer.stages import chosen_logp_alarm
from trainer.worker import RoundWorker, Schedule, due_trigger

REPO = "github.com/acme/app"
# (function, prompt, passing body, failing body, test)
TASKS = [
    (name, f"def {name}(a, b):\n", f"    return {good}\n", f"    return {bad}\n", test)
    for name, good, bad, test in [
        ("add", "a + b", "a - b", "assert add(2, 3) == 5\n"),
        ("sub", "a - b", "a + b", "assert sub(5, 3) == 2\n"),
        ("mul", "a * b", "a + b", "assert mul(2, 4) == 8\n"),
        ("biggest", "max(a, b)", "min(a, b)", "assert biggest(1, 9) == 9\n"),
        ("smallest", "min(a, b)", "max(a, b)", "assert smallest(1, 9) == 1\n"),
        ("power", "a ** b", "a * b", "assert power(2, 5) == 32\n"),
    ]
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(**overrides: Any) -> TrainConfig:
    """The tiny recipe of tests/trainer/test_train.py, without intermediate checkpoints."""
    return tiny_config(**{"save_steps": 1000, "max_steps": 2, **overrides})


def _options(**overrides: Any) -> RoundOptions:
    values: dict[str, Any] = {"n_resample": 0, "min_pairs": 2, "select": False}
    values.update(overrides)
    return RoundOptions(**values)


def add_records(session: Session, tasks: list[tuple[str, ...]] = TASKS, tag: str = "") -> None:
    """Per task, one completion that failed in CI and one that passed, with the test code."""
    for name, prompt, good, bad, test in tasks:
        for verdict, text in (("failed", bad), ("passed", good)):
            cid = f"cmpl-{name}-{verdict}{tag}"
            save_completions(
                session=session,
                records=[
                    CompletionRecord(
                        id=cid,
                        created_at=datetime.now(UTC),
                        token_id=None,
                        endpoint="completions",
                        model="tiny",
                        adapter=None,
                        prompt=prompt,
                        suffix="\n",
                        params={},
                        stream=False,
                        context={"language": "python", "file_path": "m.py", "repository": REPO},
                        choices=[ChoiceRecord(index=0, text=text, tokens=4)],
                    )
                ],
            )
            save_outcome(
                session=session,
                run={
                    "run_id": f"ci:{cid}",
                    "repository": REPO,
                    "commit": "c0",
                    "status": verdict,
                    "tests": [],
                },
                completions=[
                    {
                        "completion_id": cid,
                        "choice_index": 0,
                        "file_path": "m.py",
                        "final_text": text,
                        "status": verdict,
                        "tests": [],
                        "test_code": test,
                    }
                ],
                raw={},
                token_id=None,
            )


def _round(factory: sessionmaker[Session], model_dir: Path, rounds_dir: Path, **kw: Any):  # type: ignore[no-untyped-def]
    return run_round(
        session_factory=factory,
        base_model_dir=model_dir,
        rounds_dir=rounds_dir,
        config=kw.pop("config", None) or _config(),
        options=kw.pop("options", None) or _options(),
        progress=False,
        **kw,
    )


def test_a_round_registers_a_candidate_with_its_manifest_and_stores_its_funnel(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    options = _options(select=True, select_fraction=1.0)
    report = _round(session_factory, model_dir, tmp_path / "rounds", options=options)
    assert report.status == "succeeded", report.error
    assert report.adapter_dir is not None
    assert (report.adapter_dir / "adapter_model.safetensors").is_file()

    funnel = report.funnel
    assert funnel["completions"] == 12
    assert funnel["outcome_records"] == 12
    assert funnel["pairs"]["pairs_by_source"]["ci"] == 6
    selection = funnel["selection"]
    # CDAS on a random model: some IFDs reach 1 and are dropped; every pair is accounted for.
    assert selection["pairs"] == 6
    dropped = sum(selection[k] for k in ("not_finite", "ifd_ge_1", "cluster_fraction"))
    assert selection["selected"] + dropped + selection["repository_cap"] == 6
    assert selection["selected"] == funnel["trained_pairs"] >= 2
    trained = selection["selected"]
    assert set(report.durations) >= {"load_records", "pairs", "selection", "train"}
    assert report.metrics["steps"] == 2

    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name=report.adapter_name or "")
        assert adapter is not None and adapter.state == "candidate"
        manifest = adapter.manifest
        assert manifest["round_id"] == report.round_id
        assert len(manifest["record_ids"]) == 2 * trained  # the records of trained contexts
        assert len(manifest["pair_ids"]) == trained
        assert manifest["base_model"]["sha256"] == adapter.base_sha256
        assert manifest["parent_adapter"] is None
        assert manifest["config"]["max_steps"] == 2
        assert "loss" in manifest["metrics"]
        trail = registry.history(session=session, adapter_id=adapter.id)
        assert [(t.from_state, t.to_state, t.actor) for t in trail] == [
            (None, "candidate", "trainer")
        ]
        row = session.get(TrainingRound, report.round_id)
        assert row is not None and row.status == "succeeded"
        assert row.adapter_id == adapter.id
        assert row.funnel["trained_pairs"] == trained
        assert "rewards/chosen" in row.metrics
        assert row.durations["train"] > 0
        assert row.finished_at is not None


def test_the_next_round_continues_from_the_active_adapter(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    first = _round(session_factory, model_dir, tmp_path / "rounds")
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name=first.adapter_name or "")
        assert adapter is not None
        for state in ("evaluating", "approved", "active"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")
    second = _round(session_factory, model_dir, tmp_path / "rounds")
    assert second.status == "succeeded", second.error
    assert second.parent_adapter == first.adapter_name
    assert second.adapter_name != first.adapter_name
    with session_factory() as session:
        child = registry.get_adapter(session=session, name=second.adapter_name or "")
        assert child is not None and child.parent_id == adapter.id
        assert child.manifest["reference"] == "parent adapter"


def test_a_dry_run_reports_the_funnel_and_stores_nothing(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    report = _round(session_factory, model_dir, tmp_path / "rounds", dry_run=True)
    assert report.status == "dry_run"
    assert report.round_id is None
    assert report.funnel["pairs"]["pairs"] == 6
    with session_factory() as session:
        assert round_store.list_rounds(session=session) == []
        assert registry.list_adapters(session=session) == []
    assert not (tmp_path / "rounds").exists()


def test_too_few_pairs_skip_the_round(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session, TASKS[:1])
    report = _round(session_factory, model_dir, tmp_path / "rounds")
    assert report.status == "skipped"
    assert "fewer than min_pairs=2" in (report.error or "")
    with session_factory() as session:
        (row,) = round_store.list_rounds(session=session)
        assert row.status == "skipped" and row.error == report.error
        assert registry.list_adapters(session=session) == []


def test_a_non_finite_round_stops_registers_nothing_and_keeps_the_active_adapter(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    good = _round(session_factory, model_dir, tmp_path / "rounds")
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name=good.adapter_name or "")
        assert adapter is not None
        for state in ("evaluating", "approved", "active"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")
    bad = _round(
        session_factory, model_dir, tmp_path / "rounds", config=_config(learning_rate=1e12)
    )
    assert bad.status == "stopped"
    assert "non-finite" in (bad.error or "")
    with session_factory() as session:
        row = round_store.get_round(session=session, round_id=bad.round_id or -1)
        assert row is not None and row.status == "stopped" and "non-finite" in (row.error or "")
        assert [a.name for a in registry.list_adapters(session=session)] == [good.adapter_name]
        active = registry.active_adapter(session=session)
        assert active is not None and active.name == good.adapter_name


def test_an_unknown_parent_is_refused(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LookupError, match="no adapter named 'nope'"):
        _round(session_factory, model_dir, tmp_path / "rounds", parent="nope")


_KILLABLE_ROUND = """
import sys
from pathlib import Path
from server.store.db import make_engine, make_session_factory
from tests.trainer.test_round import _config, _options
from trainer.round import run_round

db_url, model_dir, rounds_dir = sys.argv[1:4]
run_round(
    session_factory=make_session_factory(make_engine(db_url)),
    base_model_dir=Path(model_dir),
    rounds_dir=Path(rounds_dir),
    config=_config(max_steps=40, save_steps=2),
    options=_options(),
    progress=False,
)
"""


def test_a_killed_round_is_resumed_by_the_worker(
    session_factory: sessionmaker[Session], db_url: str, model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    rounds_dir = tmp_path / "rounds"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_KILLABLE_ROUND),
            db_url,
            str(model_dir),
            str(rounds_dir),
        ],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    checkpoint = rounds_dir / "round-00001" / "train" / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 180
    while not checkpoint.is_dir():
        assert proc.poll() is None, "the round ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pairs_file = rounds_dir / "round-00001" / "pairs.json"
    pairs_written = pairs_file.stat().st_mtime_ns
    with session_factory() as session:
        (row,) = round_store.unfinished_rounds(session=session)
        assert row.id == 1

    resumed: list[int | None] = []

    def run(trigger: str, resume_round_id: int | None):  # type: ignore[no-untyped-def]
        resumed.append(resume_round_id)
        return _round(
            session_factory,
            model_dir,
            rounds_dir,
            config=_config(max_steps=40, save_steps=2),
            resume_round_id=resume_round_id,
        )

    worker = RoundWorker(
        session_factory=session_factory, rounds_dir=rounds_dir, schedule=Schedule(), run=run
    )
    report = worker.tick()
    assert resumed == [1]
    assert report is not None and report.status == "succeeded", report and report.error
    assert report.round_id == 1 and report.metrics["steps"] == 40
    assert pairs_file.stat().st_mtime_ns == pairs_written  # the pairs stage was not redone
    with session_factory() as session:
        assert round_store.unfinished_rounds(session=session) == []
        assert len(registry.list_adapters(session=session)) == 1


class _Killed(BaseException):
    """Stands in for a SIGKILL inside a stage: nothing in the round catches it, so the round's
    row stays ``running``, as after a real kill."""


def test_the_gate_is_the_rounds_last_stage(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    seen: list[tuple[str, str | None]] = []
    decision = {"decision": "approved", "reasons": ["toy: +1"], "changes": ["x is the canary"]}

    def gate(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
        with factory() as session:  # the candidate is registered before the gate sees it
            adapter = registry.get_adapter(session=session, name=name)
            seen.append((name, adapter.state if adapter else None))
        return decision

    report = _round(session_factory, model_dir, tmp_path / "rounds", gate=gate)
    assert report.status == "succeeded", report.error
    assert seen == [(report.adapter_name, "candidate")]
    assert report.gate == decision
    assert list(report.durations)[-2:] == ["register", "gate"]
    with session_factory() as session:
        row = session.get(TrainingRound, report.round_id)
        assert row is not None and row.status == "succeeded"
        assert row.funnel["gate"] == decision
    work = tmp_path / "rounds" / "round-00001"
    assert json.loads((work / "gate.json").read_text()) == decision


def test_a_round_killed_in_the_gate_resumes_at_the_gate_and_does_not_train_again(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    rounds_dir = tmp_path / "rounds"

    def killed(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
        raise _Killed

    with pytest.raises(_Killed):
        _round(session_factory, model_dir, rounds_dir, gate=killed)
    with session_factory() as session:
        (row,) = round_store.unfinished_rounds(session=session)
        (adapter,) = registry.list_adapters(session=session)
        assert row.adapter_id == adapter.id and adapter.state == "candidate"
    work = rounds_dir / f"round-{row.id:05d}"
    weights = work / "train" / "adapter" / "adapter_model.safetensors"
    written = {f: (work / f).stat().st_mtime_ns for f in ("trained.json", "registered.json")}
    weights_written = weights.stat().st_mtime_ns

    gated: list[str] = []

    def gate(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
        gated.append(name)
        return {"decision": "rejected", "reasons": ["toy: -1"], "changes": []}

    report = _round(session_factory, model_dir, rounds_dir, gate=gate, resume_round_id=row.id)
    assert report.status == "succeeded", report.error
    assert gated == [adapter.name] and report.adapter_name == adapter.name
    assert report.gate is not None and report.gate["decision"] == "rejected"
    assert weights.stat().st_mtime_ns == weights_written  # not trained again
    assert {f: (work / f).stat().st_mtime_ns for f in written} == written
    with session_factory() as session:
        assert [a.name for a in registry.list_adapters(session=session)] == [adapter.name]
        assert round_store.unfinished_rounds(session=session) == []


def test_a_gate_that_fails_fails_the_round_and_leaves_the_candidate(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)

    def broken(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
        raise RuntimeError("the gate's engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        _round(session_factory, model_dir, tmp_path / "rounds", gate=broken)
    with session_factory() as session:
        (row,) = round_store.list_rounds(session=session)
        assert row.status == "failed" and "engine died" in (row.error or "")
        (adapter,) = registry.list_adapters(session=session)
        assert adapter.state == "candidate" and row.adapter_id == adapter.id


def test_skipped_and_stopped_rounds_never_reach_the_gate(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    def gate(factory: sessionmaker[Session], name: str) -> dict[str, Any]:
        raise AssertionError("the gate ran")

    with session_factory() as session:
        add_records(session, TASKS[:1])
    skipped = _round(session_factory, model_dir, tmp_path / "a", gate=gate)
    assert skipped.status == "skipped" and skipped.gate is None
    with session_factory() as session:
        add_records(session, tag="more")
    stopped = _round(
        session_factory, model_dir, tmp_path / "b", gate=gate, config=_config(learning_rate=1e12)
    )
    assert stopped.status == "stopped" and stopped.gate is None


def test_due_trigger_counts_new_verdicts_and_the_interval(
    session_factory: sessionmaker[Session],
) -> None:
    schedule = Schedule(min_new_records=12, interval_hours=1)
    with session_factory() as session:
        assert due_trigger(session, schedule) is None
        add_records(session, TASKS[:5])  # 10 verdicts
        assert due_trigger(session, schedule) is None
        add_records(session, TASKS[5:])  # 12
        assert due_trigger(session, schedule) == "records"
        now = datetime.now(UTC)
        row = round_store.start_round(
            session=session,
            trigger="records",
            records_until=now,
            parent_adapter_id=None,
            work_dir="x",
            config={},
        )
        round_store.update_round(session=session, round_id=row.id, status="succeeded")
        assert due_trigger(session, schedule) is None  # everything was seen
        add_records(session, TASKS[:1], tag="-new")  # 2 new verdicts
        assert due_trigger(session, schedule) is None  # too few, too soon
        later = datetime.now(UTC) + timedelta(hours=2)
        assert due_trigger(session, schedule, now=later) == "schedule"


def test_one_round_at_a_time(session_factory: sessionmaker[Session], tmp_path: Path) -> None:
    calls: list[str] = []

    def run(trigger: str, resume_round_id: int | None):  # type: ignore[no-untyped-def]
        calls.append(trigger)

    with session_factory() as session:
        add_records(session)
    worker = RoundWorker(
        session_factory=session_factory,
        rounds_dir=tmp_path,
        schedule=Schedule(min_new_records=1),
        run=run,
    )
    with round_lock(tmp_path):
        busy = pytest.raises(RoundBusyError, match="another training round is running")
        with busy, round_lock(tmp_path):
            pass
        assert worker.tick() is None  # busy: nothing runs
    assert calls == []
    with session_factory() as session:
        set_rollout_state(session=session, actor="ops", training_paused=True)
    assert worker.tick() is None  # paused by ops
    assert calls == []
    with session_factory() as session:
        set_rollout_state(session=session, actor="ops", training_paused=False)
    worker.tick()
    assert calls == ["records"]


def test_chosen_logp_alarm() -> None:
    rising = [{"rewards/chosen": 0.01 * i} for i in range(8)]
    assert chosen_logp_alarm(rising) is None
    falling = [{"rewards/chosen": 0.1 - 0.05 * i} for i in range(8)]
    alarm = chosen_logp_alarm(falling)
    assert alarm is not None and "chosen log-probs fell" in alarm
    assert chosen_logp_alarm([{"loss": 1.0}]) is None


def test_round_json_files_are_complete(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    with session_factory() as session:
        add_records(session)
    report = _round(session_factory, model_dir, tmp_path / "rounds")
    work = tmp_path / "rounds" / f"round-{report.round_id:05d}"
    pairs = json.loads((work / "pairs.json").read_text())
    selection = json.loads((work / "selection.json").read_text())
    assert len(pairs["pairs"]) == 6 and set(pairs["info"]) == {p["id"] for p in pairs["pairs"]}
    assert sorted(selection["selected"]) == sorted(p["id"] for p in pairs["pairs"])
    assert not list(work.rglob("*.partial"))


# -- governance: secrets, exclusions, retention, resampling as served -------------------------


def _add(
    session: Session,
    cid: str,
    *,
    prompt: str,
    suffix: str | None,
    text: str,
    verdict: str,
    test: str | None,
    repository: str = REPO,
    final_text: str | None = None,
    run: str | None = None,
    token_id: int | None = None,
) -> None:
    save_completions(
        session=session,
        records=[
            CompletionRecord(
                id=cid,
                created_at=datetime.now(UTC),
                token_id=None,
                endpoint="completions",
                model="tiny",
                adapter=None,
                prompt=prompt,
                suffix=suffix,
                params={"max_tokens": 64},
                stream=False,
                context={"language": "python", "file_path": "m.py", "repository": repository},
                choices=[ChoiceRecord(index=0, text=text, tokens=4, finish_reason="stop")],
            )
        ],
    )
    _verdict(
        session, cid, final_text or text, verdict, test, run or f"ci:{cid}", repository, token_id
    )


def _verdict(
    session: Session,
    cid: str,
    text: str,
    verdict: str,
    test: str | None,
    run: str,
    repo: str,
    token_id: int | None = None,
) -> None:
    save_outcome(
        session=session,
        run={"run_id": run, "repository": repo, "commit": "c0", "status": verdict, "tests": []},
        completions=[{"completion_id": cid, "choice_index": 0, "file_path": "m.py",
                      "final_text": text, "status": verdict, "tests": [], "test_code": test}],
        raw={},
        token_id=token_id,
    )  # fmt: skip


def test_planted_secrets_reach_neither_pairs_nor_selection_nor_trained_batches(
    session_factory: sessionmaker[Session],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS keys, a private-key block, a password in a URL, a JWT and a high-entropy token,
    planted in recorded completions (prompt, suffix, passing text, failing text, the fix),
    go through the real round: records -> pairs.json -> selection.json -> the batches the
    trainer's collator builds. None of them is there; the funnel counts them."""
    from tests.trainer.test_secrets import PLANTS, SECRET_STRINGS
    from trainer.packing import PackedPreferenceCollator

    with session_factory() as session:
        add_records(session)  # six clean tasks
        for i, (_kind, line) in enumerate(sorted(PLANTS.items())):
            name = f"leak{i}"
            prompt = f"def {name}(a, b):\n"
            test = f"assert {name}(2, 3) == 5\n"
            good, bad = "    return a + b\n", "    return a - b\n"
            where = i % 5
            if where == 0:
                prompt = f"{line.strip()}\n{prompt}"
            suffix = f"\n{line.strip()}\n" if where == 1 else "\n"
            if where == 2:
                good = f"{line}\n{good}"
            if where == 3:
                bad = f"{line}\n{bad}"
            _add(session, f"cmpl-{name}-f", prompt=prompt, suffix=suffix, text=bad,
                 verdict="failed", test=test)  # fmt: skip
            if where == 4:  # the failure -> "fix" case: the fix carries the secret
                fix = f"{good}{line}\n"
                _verdict(session, f"cmpl-{name}-f", fix, "passed", test, f"ci:{name}-fix", REPO)
            else:
                _add(session, f"cmpl-{name}-p", prompt=prompt, suffix=suffix, text=good,
                     verdict="passed", test=test)  # fmt: skip
        # A clean task's context with one more failure, holding a key: the context still
        # trains (its clean records), that record does not.
        name, prompt, _good, bad, test = TASKS[0]
        leak = f"{PLANTS['aws_key']}\n{bad}"
        _add(session, "cmpl-extra", prompt=prompt, suffix="\n", text=leak, verdict="failed",
             test=test)  # fmt: skip

    batches: list[dict[str, Any]] = []
    original = PackedPreferenceCollator.__call__

    def spy(self: PackedPreferenceCollator, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batches.extend(examples)
        return original(self, examples)

    monkeypatch.setattr(PackedPreferenceCollator, "__call__", spy)
    options = _options(select=True, select_fraction=1.0)
    report = _round(session_factory, model_dir, tmp_path / "rounds", options=options)
    assert report.status == "succeeded", report.error

    work = tmp_path / "rounds" / f"round-{report.round_id:05d}"
    pairs_text = (work / "pairs.json").read_text()
    selection_text = (work / "selection.json").read_text()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trained = [
        tokenizer.decode(list(b["prompt_ids"]) + list(b["chosen_ids"]) + list(b["rejected_ids"]))
        for b in batches
    ]
    assert trained, "the collator saw the training batches"
    for secret in SECRET_STRINGS:
        assert secret not in pairs_text
        assert secret not in selection_text
        assert not any(secret in text for text in trained), secret
    funnel = report.funnel["pairs"]
    # Every planted task lost its secret record(s); the clean tasks all made pairs.
    assert funnel["records_dropped"]["secret"] >= len(PLANTS) + 1
    assert funnel["pairs_by_source"]["ci"] == 6 and funnel["pairs"] == 6
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name=report.adapter_name or "")
        assert adapter is not None
        record_ids = adapter.manifest["record_ids"]
    dropped = json.loads(pairs_text)["dropped_records"]
    assert dropped["cmpl-extra:0:ci:cmpl-extra"] == "secret"
    assert not set(dropped) & set(record_ids)


def test_an_excluded_repository_is_left_out_from_the_next_round(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    from server.store.governance import exclude_repository

    other = "github.com/acme/contract-work"
    with session_factory() as session:
        add_records(session)
        for name, prompt, good, bad, test in TASKS[:2]:
            for verdict, text in (("failed", bad), ("passed", good)):
                cid = f"cmpl-{name}-{verdict}-other"
                _add(session, cid, prompt=f"# x\n{prompt}", suffix="\n", text=text,
                     verdict=verdict, test=test, repository=other)  # fmt: skip
    before = _round(session_factory, model_dir, tmp_path / "r1", dry_run=True)
    assert before.funnel["pairs"]["pairs"] == 8
    with session_factory() as session:
        exclude_repository(session=session, repository=other, actor="ops:test")
    after = _round(session_factory, model_dir, tmp_path / "r2", dry_run=True)
    assert after.funnel["excluded_repositories"] == [other]
    assert after.funnel["pairs"]["records_dropped"]["excluded_repository"] == 4
    assert after.funnel["pairs"]["pairs"] == 6


def test_the_worker_prunes_records_past_the_retention_window(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    from server.store.models import CiRun, Completion

    with session_factory() as session:
        add_records(session)
        old = datetime.now(UTC) - timedelta(days=10)
        for row in session.scalars(select(Completion)):
            row.created_at = old
        for run in session.scalars(select(CiRun)):
            run.received_at = old
        session.commit()
    calls: list[str] = []

    def run(trigger: str, resume_round_id: int | None):  # type: ignore[no-untyped-def]
        calls.append(trigger)

    keep = RoundWorker(session_factory=session_factory, rounds_dir=tmp_path,
                       schedule=Schedule(min_new_records=10_000), run=run)  # fmt: skip
    keep.tick()
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Completion)) == 12
    worker = RoundWorker(session_factory=session_factory, rounds_dir=tmp_path,
                         schedule=Schedule(min_new_records=10_000), run=run,
                         retention_days=7)  # fmt: skip
    worker.tick()
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Completion)) == 0
        assert session.scalar(select(func.count()).select_from(CiRun)) == 0
    assert calls == []


def test_resampling_repeats_the_served_request_and_drops_cut_off_samples() -> None:
    from trainer.generate import GeneratedChoice, GenerationRequest
    from trainer.pairs import ResampleAsk
    from trainer.stages import _batch_resampler

    class Recording:
        def __init__(self) -> None:
            self.requests: list[GenerationRequest] = []
            self.kwargs: dict[str, Any] = {}

        def generate_choices(self, requests, **kwargs):  # type: ignore[no-untyped-def]
            self.requests += requests
            self.kwargs = kwargs
            row = [GeneratedChoice("return a + b", "stop"), GeneratedChoice("return (a", "length")]
            return [row for _ in requests]

        def generate(self, requests, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError("generate_choices is preferred")

        def close(self) -> None:
            pass

    generator = Recording()
    resample = _batch_resampler(lambda: generator, None, RoundOptions(resample_max_tokens=99))
    asks = [ResampleAsk("def f(a, b):\n    ", "\n", single_line=True, stop=("\n",), max_tokens=7)]
    assert resample(asks, 2) == [["return a + b"]]  # the cut-off sample is no answer
    assert generator.requests == [
        GenerationRequest("def f(a, b):\n    ", "\n", single_line=True, stop=("\n",), max_tokens=7)
    ]
    assert generator.kwargs["max_tokens"] == 99 and generator.kwargs["n"] == 2


def test_the_funnel_names_each_reporting_tokens_share(
    session_factory: sessionmaker[Session], model_dir: Path, tmp_path: Path
) -> None:
    from server.store.tokens import Role, create_token

    with session_factory() as session:
        busy = create_token(session=session, name="ci-busy", role=Role.CI)[0].id
        quiet = create_token(session=session, name="ci-quiet", role=Role.CI)[0].id
        for i, (name, prompt, good, bad, test) in enumerate(TASKS):
            token = busy if i < 4 else quiet
            for verdict, text in (("failed", bad), ("passed", good)):
                _add(session, f"cmpl-{name}-{verdict}", prompt=prompt, suffix="\n", text=text,
                     verdict=verdict, test=test, token_id=token)  # fmt: skip
    report = _round(session_factory, model_dir, tmp_path / "rounds", dry_run=True)
    funnel = report.funnel
    assert funnel["reporting_tokens"] == {str(busy): "ci-busy", str(quiet): "ci-quiet"}
    pairs = funnel["pairs"]
    assert pairs["token_shares_before_cap"] == {str(busy): round(4 / 6, 4), str(quiet): 0.3333}
    # The default cap (half the round) holds the busy token to half of what is trained.
    assert pairs["token_shares"] == {str(busy): 0.5, str(quiet): 0.5}
    assert pairs["dropped"]["token_cap"] == 2 and pairs["pairs"] == 4
