"""Judge pairs (trainer.pairs.build_judge_pairs, trainer.judging.judge_round): only among
alternatives of a context nothing executed, weighted below execution pairs, capped, never over
a sealed verdict, and only once the judge agrees with the sealed verdicts often enough."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.store.models import (
    CiRun,
    Completion,
    CompletionExecutability,
    CompletionOutcome,
    JudgeVerdictRow,
    RecordedChoice,
)
from trainer.config import TrainConfig
from trainer.judge import PROMPT_VERSION, QUESTIONS, JudgeItem, JudgeVerdict
from trainer.judging import JudgeOptions, judge_round
from trainer.pairs import Alternative, build_judge_pairs
from trainer.pipeline import RoundOptions
from trainer.records import context_key, load_outcome_records
from trainer.round import run_round
from trainer.sandbox import Sandbox

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
YES = JudgeVerdict(dict.fromkeys(QUESTIONS, True), raw="api: yes\nconsistent: yes\nruns: yes")
NO = JudgeVerdict({"api": True, "consistent": True, "runs": False}, raw="...runs: no")
UNPARSED = JudgeVerdict(dict.fromkeys(QUESTIONS), raw="yes\nyes\nyes")


def alt(cid: str, text: str, prompt: str = "def f(x):\n    ", index: int = 0) -> Alternative:
    return Alternative(
        completion_id=cid,
        choice_index=index,
        context_key=context_key(prompt, "\n"),
        endpoint="completions",
        prompt=prompt,
        suffix="\n",
        text=text,
        language="python",
    )


def test_judge_pairs_among_alternatives_without_a_verdict() -> None:
    good, bad = alt("c1", "return x + 1"), alt("c2", "return x +")
    result = build_judge_pairs(
        [good, bad], {good.id: YES, bad.id: NO}, verified_contexts=set(), weight=0.5, max_pairs=8
    )
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected, pair.source, pair.weight) == (
        "return x + 1",
        "return x +",
        "judge",
        0.5,
    )
    assert pair.prompt.startswith("<|fim_prefix|>def f(x):")  # as the model saw it
    assert result.info[pair.id].source == "judge"


def test_a_sealed_verdict_on_the_context_is_never_overridden() -> None:
    good, bad = alt("c1", "return x + 1"), alt("c2", "return x +")
    result = build_judge_pairs(
        [good, bad],
        {good.id: YES, bad.id: NO},
        verified_contexts={good.context_key},
        weight=0.5,
        max_pairs=8,
    )
    assert result.pairs == [] and result.funnel["dropped"]["verified_context"] == 2


def test_unparsed_conflicting_and_non_executable_texts_are_no_side() -> None:
    good, bad, mute = alt("c1", "return x + 1"), alt("c2", "return x +"), alt("c3", "return 0")
    unparsed = build_judge_pairs(
        [good, mute],
        {good.id: YES, mute.id: UNPARSED},
        verified_contexts=(),
        weight=0.5,
        max_pairs=8,
    )
    assert unparsed.pairs == [] and unparsed.funnel["dropped"]["unparsed"] == 1
    # The same text called correct by one record and wrong by another: no side.
    twice = alt("c4", "return x + 1")
    conflicting = build_judge_pairs(
        [good, twice, bad],
        {good.id: YES, twice.id: NO, bad.id: NO},
        verified_contexts=(),
        weight=0.5,
        max_pairs=8,
    )
    assert conflicting.pairs == [] and conflicting.funnel["dropped"]["conflicting"] == 1
    broken = build_judge_pairs(
        [good, bad],
        {good.id: YES, bad.id: NO},
        verified_contexts=(),
        weight=0.5,
        max_pairs=8,
        executable={good.id: False},
    )
    assert broken.pairs == [] and broken.funnel["dropped"]["not_executable"] == 1


def test_judge_pairs_are_capped_per_round_and_weigh_less() -> None:
    alternatives, calls = [], {}
    for i in range(5):
        prompt = f"def f{i}(x):\n    "
        good, bad = alt(f"g{i}", "return x", prompt), alt(f"b{i}", "return", prompt)
        alternatives += [good, bad]
        calls |= {good.id: YES, bad.id: NO}
    result = build_judge_pairs(alternatives, calls, verified_contexts=(), weight=0.25, max_pairs=2)
    assert len(result.pairs) == 2 and result.funnel["dropped"]["cap"] == 3
    assert all(p.weight == 0.25 for p in result.pairs)
    for weight in (1.0, 0.0, 1.5):
        with pytest.raises(ValueError, match="weighs less"):
            build_judge_pairs(alternatives, calls, verified_contexts=(), weight=weight, max_pairs=2)


# -- the round's judge step, on a migrated database -----------------------------------------

CALIBRATION_PROMPT = "def add(a, b):\n    "
OPEN_PROMPT = "import math\n\ndef area(r):\n    "


class ScriptedJudge:
    """Calls a text correct when it is in ``correct``; records what it was asked."""

    name = "scripted"
    prompt_version = "test-v1"

    def __init__(self, correct: set[str]) -> None:
        self.correct = correct
        self.asked: list[str] = []

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        self.asked += [i.completion for i in items]
        return [YES if i.completion in self.correct else NO for i in items]


def _completion(session: Session, cid: str, prompt: str, texts: list[str], at: datetime) -> None:
    session.add(
        Completion(
            id=cid,
            created_at=at,
            endpoint="completions",
            model="m",
            adapter=None,
            prompt=prompt,
            suffix="\n",
            params={},
            stream=False,
            status="completed",
            latency_ms=1.0,
            language="python",
        )
    )
    for i, text in enumerate(texts):
        session.add(RecordedChoice(completion_id=cid, index=i, text=text, finish_reason="stop"))
    session.commit()


def _outcome(session: Session, cid: str, text: str, status: str, n: int) -> None:
    run = CiRun(
        run_id=f"run-{n}",
        repository="github.com/acme/app",
        repository_key="github.com/acme/app",
        commit="c0ffee",
        status=status,
        tests=[],
        raw={},
        received_at=T0 + timedelta(minutes=n),
    )
    session.add(run)
    session.flush()
    session.add(
        CompletionOutcome(
            ci_run_id=run.id,
            run_id=run.run_id,
            completion_id=cid,
            file_path="app.py",
            final_text=text,
            status=status,
            tests=[],
            received_at=run.received_at,
        )
    )
    session.commit()


@pytest.fixture
def world(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Six sealed verdicts on one context (3 pass, 3 fail), and two contexts nothing ran: one
    of alternatives (two choices), one that also has a verdict on another of its texts."""
    with session_factory() as session:
        for n in range(6):
            text = f"return a + b  # {n}" if n % 2 == 0 else f"return a - b  # {n}"
            _completion(session, f"cal-{n}", CALIBRATION_PROMPT, [text], T0)
            _outcome(session, f"cal-{n}", text, "passed" if n % 2 == 0 else "failed", n)
        _completion(
            session, "open-1", OPEN_PROMPT, ["return math.pi * r ** 2", "return math.pie * r"], T0
        )
        _completion(session, "seen-1", "def g():\n    ", ["return 1", "return 2"], T0)
        _completion(session, "seen-2", "def g():\n    ", ["return 3"], T0)
        _outcome(session, "seen-2", "return 3", "passed", 10)
    return session_factory


OPTIONS = JudgeOptions(min_agreement=0.75, min_judged=6, calibration_items=16, max_pairs=8)


def test_an_agreeing_judge_makes_pairs_only_where_nothing_executed(
    world: sessionmaker[Session],
) -> None:
    with world() as session:
        records = load_outcome_records(session=session)
    # Right on every sealed verdict, and it likes every text of the verified context too.
    correct = {f"return a + b  # {n}" for n in (0, 2, 4)} | {"return math.pi * r ** 2"}
    judge = ScriptedJudge(correct | {"return 1", "return 3"})
    built, funnel = judge_round(
        session_factory=world,
        records=records,
        judge=judge,
        options=OPTIONS,
        sandbox=Sandbox(workers=1),
    )
    assert funnel["used"] is True and funnel["agreement"]["agreement"] == 1.0
    # Seven sealed verdicts: the six above and the verified context's pass.
    assert funnel["agreement"]["judged"] == 7 and funnel["agreement"]["precision"] == 1.0
    assert built is not None
    assert [(p.chosen, p.rejected, p.weight) for p in built.pairs] == [
        ("return math.pi * r ** 2", "return math.pie * r", 0.5)
    ]
    # The context with a sealed verdict was not even asked about.
    assert "return 1" not in judge.asked and "return 2" not in judge.asked
    with world() as session:
        stored = session.scalars(select(JudgeVerdictRow)).all()
        checks = session.scalars(select(CompletionExecutability)).all()
    assert len(stored) == 9  # 7 calibration + 2 alternatives
    assert {(v.judge_name, v.prompt_version) for v in stored} == {("scripted", "test-v1")}
    by_text = {c.text_sha256: c for c in checks}
    assert len(checks) == 2 and all(c.checked_in == "sandbox" for c in checks)
    from server.store.signals import text_sha256

    assert by_text[text_sha256("return math.pie * r")].api_ok is False  # math has no 'pie'
    assert by_text[text_sha256("return math.pi * r ** 2")].executable is True


def test_a_ci_check_in_the_projects_environment_vetoes_a_chosen_text(
    world: sessionmaker[Session],
) -> None:
    from server.store.signals import record_executability

    with world() as session:
        records = load_outcome_records(session=session)
        # CI found the text the judge likes does not import in the project.
        record_executability(
            session=session,
            completion_id="open-1",
            choice_index=0,
            text="return math.pi * r ** 2",
            result={"parses": True, "imports": False, "api": True, "executable": False},
            checked_in="ci",
        )
    correct = {f"return a + b  # {n}" for n in (0, 2, 4)} | {"return 3", "return math.pi * r ** 2"}
    built, funnel = judge_round(
        session_factory=world,
        records=records,
        judge=ScriptedJudge(correct),
        options=OPTIONS,
        sandbox=Sandbox(workers=1),
    )
    assert funnel["used"] is True and built is not None and built.pairs == []
    assert built.funnel["dropped"]["not_executable"] == 1


def test_a_judge_below_the_agreement_threshold_makes_no_pairs(
    world: sessionmaker[Session],
) -> None:
    with world() as session:
        records = load_outcome_records(session=session)
    yes_man = ScriptedJudge(
        {f"return a {op} b  # {n}" for n in range(6) for op in "+-"}
        | {"return math.pi * r ** 2", "return 3"}
    )
    built, funnel = judge_round(
        session_factory=world,
        records=records,
        judge=yes_man,
        options=OPTIONS,
        sandbox=Sandbox(workers=1),
    )
    assert built is None and funnel["used"] is False and funnel["pairs"] == 0
    # Yes to everything: right on the 4 passes, wrong on the 3 failures.
    assert funnel["agreement"]["agreement"] == round(4 / 7, 4)
    assert funnel["agreement"]["majority"] == round(4 / 7, 4)
    # Only the calibration was asked: alternatives are never judged for a judge not trusted.
    assert len(yes_man.asked) == 7


def test_too_few_sealed_verdicts_keep_the_judge_off(world: sessionmaker[Session]) -> None:
    with world() as session:
        records = load_outcome_records(session=session)
    perfect = ScriptedJudge({f"return a + b  # {n}" for n in (0, 2, 4)} | {"return 3"})
    options = JudgeOptions(min_agreement=0.75, min_judged=8, calibration_items=16)
    built, funnel = judge_round(
        session_factory=world,
        records=records,
        judge=perfect,
        options=options,
        sandbox=Sandbox(workers=1),
    )
    assert funnel["agreement"]["agreement"] == 1.0 and funnel["used"] is False and built is None


# -- in the round: the pairs stage's funnel ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.utils.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("judge-round") / "model")


def test_the_rounds_funnel_shows_the_judges_agreement(
    world: sessionmaker[Session], tiny_model: Path, tmp_path: Path
) -> None:
    """A dry run with the tiny (random) model as judge: its replies do not parse, so its
    agreement is 0, below the threshold, and the round makes no judge pairs."""
    options = RoundOptions(
        n_resample=0,
        min_pairs=1,
        select=False,
        judge_model=str(tiny_model),
        judge_min_judged=4,
        judge_calibration_items=8,
    )
    report = run_round(
        session_factory=world,
        base_model_dir=tiny_model,
        rounds_dir=tmp_path / "rounds",
        config=TrainConfig(),
        options=options,
        dry_run=True,
        progress=False,
    )
    judge = report.funnel["pairs"]["judge"]
    assert judge["judge"] == "model" and judge["prompt_version"] == PROMPT_VERSION
    assert judge["agreement"]["judged"] == 7 and judge["agreement"]["agreement"] == 0.0
    assert judge["used"] is False and judge["pairs"] == 0
    assert report.funnel["pairs"]["pairs_by_source"].get("judge", 0) == 0
    assert report.funnel["judge_agreement"] == 0.0
    with world() as session:
        stored = session.scalars(select(JudgeVerdictRow)).all()
    assert len(stored) == 7 and all(v.raw.startswith("api:") for v in stored)


def test_the_pairs_stage_adds_judge_pairs_of_a_trusted_judge(
    world: sessionmaker[Session], tiny_model: Path
) -> None:
    from trainer.stages import _build_pairs_stage

    correct = {f"return a + b  # {n}" for n in (0, 2, 4)} | {"return 3", "return math.pi * r ** 2"}
    built = _build_pairs_stage(
        load_records(world),
        options=RoundOptions(n_resample=0, judge_min_judged=4),
        parent_dir=None,
        generator_factory=None,
        base_model_dir=tiny_model,
        budget=512,
        session_factory=world,
        judge=ScriptedJudge(correct),
    )
    funnel = built["funnel"]
    assert funnel["judge"]["used"] is True and funnel["judge"]["pairs"] == 1
    assert funnel["pairs_by_source"]["judge"] == 1
    sources = sorted((p["source"], p["weight"]) for p in built["pairs"])
    # The execution pairs of the calibration context weigh 1, the judge pair less.
    assert ("judge", 0.5) in sources and all(w == 1.0 for s, w in sources if s != "judge")
    assert sum(s == "ci" for s, _ in sources) > 0


def load_records(factory: sessionmaker[Session]) -> list[Any]:
    with factory() as session:
        return load_outcome_records(session=session)


def test_judge_settings_resolve_the_bundled_model(tmp_path: Path) -> None:
    from server.config import Settings
    from trainer.judging import judge_settings

    off = judge_settings(Settings(home=tmp_path))
    assert off["judge_model"] == "" and RoundOptions(**off).judge_model == ""
    on = judge_settings(
        Settings(home=tmp_path, judge_model="bundled", judge_min_agreement=0.9, judge_max_pairs=3)
    )
    assert on["judge_model"] == str(tmp_path / "models" / "qwen2.5-coder-0.5b-instruct")
    options = RoundOptions(**on)
    assert (options.judge_min_agreement, options.judge_max_pairs) == (0.9, 3)
