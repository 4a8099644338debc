"""The evaluation gate: the decision rule on its own, held-out recorded tasks, the gate end to end
with a scripted generator, the real sandbox and a real (migrated SQLite) registry, and once with
the real engine and two adapters trained on the tiny model, one known to be better."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.feedback import save_outcome
from tests.utils.fake_engine import FakeEngine
from trainer.gate import (
    GateConfig,
    GateResult,
    SuiteScores,
    decide,
    judge,
    recorded_tasks,
    run_gate,
)
from trainer.generate import GenerationRequest, prepare_request
from trainer.records import OutcomeRecord, context_key
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.tasks import Task

MBPP_PATH = None  # the bundled MBPP+ (toy suites load none of it)

# One deterministic answer per task: toy tests. The executability rate costs a sandbox run per
# failing completion, so it is on only where a test asserts it.
GREEDY = GateConfig(samples=1, temperature=0.0, executability=False)
WITH_EXECUTABILITY = GateConfig(samples=1, temperature=0.0)

# -- decide -----------------------------------------------------------------------------------


def _scores(prefix: str, base: Sequence[float], cand: Sequence[float]) -> SuiteScores:
    return SuiteScores(
        tuple(f"{prefix}/{i}" for i in range(len(base))), np.array(base), np.array(cand)
    )


def _suite(prefix: str, n: int, wins: int, losses: int, both: int = 0) -> SuiteScores:
    """``n`` tasks: ``wins`` only the candidate passes, ``losses`` only the baseline, ``both``
    both; the rest neither."""
    base = [0.0] * wins + [1.0] * losses + [1.0] * both
    cand = [1.0] * wins + [0.0] * losses + [1.0] * both
    rest = n - len(base)
    return _scores(prefix, base + [0.0] * rest, cand + [0.0] * rest)


def test_variants_of_one_problem_count_once() -> None:
    # 30 HumanEval problems, each asked whole and as a single-line infill, won on both rows.
    ids = tuple(f"HumanEval/{i}" for i in range(30))
    whole = SuiteScores(ids, np.zeros(30), np.r_[np.ones(8), np.zeros(22)])
    infill = SuiteScores(
        tuple(f"{t}/line" for t in ids), np.zeros(30), np.r_[np.ones(8), np.zeros(22)]
    )
    verdict = judge({"humaneval": whole, "humaneval_fim": infill}, GateConfig())
    # 30 problems, not 60 rows: the pool is no more certain than one suite alone.
    assert verdict.pooled.n == 30
    alone = judge({"humaneval": whole}, GateConfig()).pooled
    assert verdict.pooled.mean == pytest.approx(alone.mean)
    assert verdict.pooled.lower == pytest.approx(alone.lower)
    # Counted as 60 independent rows, the bound would be tighter than the data supports.
    rows = SuiteScores(
        ids + tuple(f"x/{i}" for i in range(30)), np.zeros(60), np.tile(whole.candidate, 2)
    )
    assert judge({"rows": rows}, GateConfig()).pooled.lower > alone.lower


def test_decide_approves_a_clear_gain_with_the_bound_in_its_reasons() -> None:
    suites = {"recorded": _suite("r", 50, 20, 2), "humaneval": _suite("h", 100, 3, 3)}
    decision, reasons, verdict = decide(suites, GateConfig())
    assert decision == "approved", reasons
    assert verdict.pooled.n == 150
    assert verdict.pooled.mean == pytest.approx(0.12)
    assert reasons[0].startswith("pooled +12.0 points over 150 problems, lower bound +")
    assert "at 99.6% (family alpha 0.04 over 10 rounds)" in reasons[0]
    assert len(reasons) == 1


def test_decide_rejects_when_the_bound_does_not_exceed_the_margin() -> None:
    suites = {"mbpp_dev": _suite("m", 100, 15, 2)}  # +13 points, lower bound about +2.6
    assert decide(suites, GateConfig())[0] == "approved"
    decision, reasons, verdict = decide(suites, GateConfig(margin_points=5.0))
    assert decision == "rejected"
    assert 0 < float(verdict.pooled.lower) * 100 < 5
    assert reasons[-1].endswith("does not exceed the margin of 5.0")


def test_decide_rejects_a_large_gain_on_too_few_problems() -> None:
    # +30 points on 3 of 10 tasks: the old margin rule (gain >= 1 point) approved this.
    decision, reasons, verdict = decide({"mbpp_dev": _suite("m", 10, 3, 0)}, GateConfig())
    assert decision == "rejected"
    assert float(verdict.pooled.mean) == pytest.approx(0.3) and float(verdict.pooled.lower) < 0


def test_a_recorded_loss_is_a_veto_like_any_other() -> None:
    # The old gate approved this (recorded was exempt from the per-suite veto).
    suites = {"recorded": _suite("r", 100, 0, 5, both=45), "mbpp_dev": _suite("m", 100, 30, 0)}
    decision, reasons, verdict = decide(suites, GateConfig())
    assert float(verdict.pooled.mean) > 0.10 and float(verdict.pooled.lower) > 0
    assert decision == "rejected"
    assert verdict.judged == {"recorded": True, "mbpp_dev": True}
    assert reasons[1].startswith("recorded may be worse: -5.0 points, lower bound -")
    assert reasons[1].endswith("at 95% is below -5.0")
    # A public suite is held to the same bound.
    public = {"humaneval": _suite("h", 100, 0, 5, both=45), "recorded": _suite("r", 100, 30, 0)}
    assert decide(public, GateConfig())[0] == "rejected"
    # With a looser non-inferiority margin it passes.
    assert decide(suites, GateConfig(ni_points=15.0))[0] == "approved"


def test_a_suite_too_small_to_bound_is_reported_not_judged() -> None:
    suites = {"recorded": _suite("r", 4, 0, 1), "mbpp_dev": _suite("m", 100, 30, 0)}
    decision, reasons, verdict = decide(suites, GateConfig())
    assert decision == "approved", reasons
    assert verdict.judged["recorded"] is False
    assert "recorded: 4 problems (< 10) cannot bound a loss; -25.0 points, not judged" in reasons


def test_decide_ignores_suites_without_tasks() -> None:
    suites = {"mbpp_dev": _suite("m", 100, 15, 2)}
    empty = SuiteScores((), np.zeros(0), np.zeros(0))
    decision, reasons, verdict = decide({**suites, "recorded": empty}, GateConfig())
    assert decision == "approved" and "recorded: no tasks, ignored" in reasons
    assert float(verdict.pooled.lower) == float(decide(suites, GateConfig())[2].pooled.lower)
    decision, reasons, _ = decide({"recorded": empty}, GateConfig())
    assert decision == "rejected" and "no tasks to evaluate" in reasons


def test_judge_runs_many_gates_at_once_as_it_runs_one() -> None:
    rng = np.random.default_rng(0)
    base = rng.binomial(16, 0.5, (50, 80)) / 16
    cand = rng.binomial(16, 0.56, (50, 80)) / 16
    ids = tuple(f"m/{i}" for i in range(80))
    batch = judge({"m": SuiteScores(ids, base, cand)}, GateConfig()).approved
    one_by_one = [
        bool(judge({"m": SuiteScores(ids, base[i], cand[i])}, GateConfig()).approved)
        for i in range(50)
    ]
    assert batch.tolist() == one_by_one and 0 < sum(one_by_one) < 50


def test_the_round_level_keeps_ten_rounds_of_no_gain_candidates_within_five_percent() -> None:
    # Ten rounds of candidates that equal the baseline, fresh samples each round, on fixed
    # suites of the default size: at most 5% of installs approve any of them.
    rng = np.random.default_rng(1)
    sims, n = 2000, 224
    p = 1 / (1 + np.exp(-rng.normal(0, 2, (sims, n))))  # fixed problems per install
    ids = tuple(f"m/{i}" for i in range(n))
    config = GateConfig()
    ever = np.zeros(sims, dtype=bool)
    for _ in range(10):
        base = rng.binomial(config.samples, p) / config.samples
        cand = rng.binomial(config.samples, p) / config.samples
        ever |= judge({"m": SuiteScores(ids, base, cand)}, config).approved
    # Bonferroni over 10 rounds at 0.004 each: 1 - 0.996**10 = 3.9% if the bound is exact; the
    # goal is 5%, and 2000 installs carry 0.45 points of Monte Carlo error.
    assert ever.mean() <= 0.05
    assert config.alpha == pytest.approx(0.004)
    # The old rule's level (0.05 per round) approves far more often.
    loose = GateConfig(rounds=1)
    ever = np.zeros(sims, dtype=bool)
    for _ in range(10):
        base = rng.binomial(config.samples, p) / config.samples
        cand = rng.binomial(config.samples, p) / config.samples
        ever |= judge({"m": SuiteScores(ids, base, cand)}, loose).approved
    assert ever.mean() > 0.25


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"suites": ()}, "suites is empty"),
        ({"suites": ("nope",)}, r"\['nope'\] cannot gate; use recorded"),
        ({"suites": ("mbpp_test",)}, "held-out set"),
        ({"suites": ("humaneval", "humaneval")}, "twice"),
        ({"limit": -1}, "limit"),
        ({"family_alpha": 0.0}, "family_alpha"),
        ({"rounds": 0}, "rounds"),
        ({"ni_alpha": 1.0}, "ni_alpha"),
        ({"ni_points": -1.0}, "ni_points"),
        ({"ni_min_tasks": 1}, "ni_min_tasks"),
        ({"margin_points": -1.0}, "margin_points"),
        ({"samples": 0}, "samples"),
        ({"samples": 4, "temperature": 0.0}, "set a temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_gate_config_refuses_what_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GateConfig(**values)


# -- recorded tasks ---------------------------------------------------------------------------

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _record(
    cid: str,
    prompt: str,
    suffix: str | None,
    *,
    test_code: str | None,
    run: int = 0,
    endpoint: str = "completions",
    language: str | None = "python",
    status: str = "failed",
) -> OutcomeRecord:
    return OutcomeRecord(
        completion_id=cid,
        choice_index=0,
        context_key=context_key(prompt, suffix),
        endpoint=endpoint,
        prompt=prompt,
        suffix=suffix,
        language=language,
        completion_text="x",
        final_text="x",
        status=status,
        run_id=f"ci:{run}",
        repository="github.com/acme/app",
        file_path="m.py",
        adapter=None,
        received_at=T0 + timedelta(minutes=run),
        test_code=test_code,
    )


def _rid(r: OutcomeRecord) -> str:
    return f"{r.completion_id}:{r.choice_index}:{r.run_id}"


def test_recorded_tasks_leave_out_trained_contexts_and_those_without_tests() -> None:
    a = _record("a", "def a():\n", "\n", test_code="assert a() == 1\n")
    b1 = _record("b1", "def b():\n", "\n", test_code="assert b() == 2\n", run=1)
    b2 = _record("b2", "def b():\n", "\n", test_code="assert b() == 2\n", run=2)
    c = _record("c", "def c():\n", "\n", test_code=None)
    d = _record("d", "def d():\n", "\n", test_code="assert d() == 4\n")
    records = [a, b1, b2, c, d]
    everything = recorded_tasks(records, exclude_record_ids=set())
    assert [t.prompt for t in everything] == sorted(
        ["def a():\n", "def b():\n", "def d():\n"], key=lambda p: context_key(p, "\n")
    )
    # A context with any trained record is out (here only one of b's records was trained on).
    held_out = recorded_tasks(records, exclude_record_ids={_rid(a), _rid(b1)})
    assert [t.prompt for t in held_out] == ["def d():\n"]
    (task,) = held_out
    assert task.task_id == "recorded/" + context_key("def d():\n", "\n")[:16]
    assert task.source == "recorded" and task.test == "assert d() == 4\n"
    assert not task.single_line


def test_recorded_tasks_one_per_context_with_the_newest_test() -> None:
    records = [
        _record("x", "def f():\n", "\n", test_code="assert f() == 1\n", run=1),
        _record("x", "def f():\n", "\n", test_code="assert f() == 2\n", run=2, status="passed"),
        _record("y", "def f():\n", "\n", test_code=None, run=3),  # the same context again
    ]
    (task,) = recorded_tasks(records, exclude_record_ids=set())
    assert task.test == "assert f() == 2\n"
    assert task.task_id == "recorded/" + records[0].context_key[:16]


def test_recorded_tasks_plain_and_fim_prompts_read_as_the_server_reads_them() -> None:
    plain = _record("p", "def plain():\n    return", None, test_code="assert plain() == 1\n")
    fim = _record("f", "def fim():\n    return ", "\n\nx = 1\n", test_code="assert fim() == 1\n")
    chat = _record("c", "<|im_start|>user\nhi", None, test_code="assert 1\n", endpoint="chat")
    js = _record("j", "function f() {", "}", test_code="assert 1\n", language="javascript")
    tasks = {t.prompt: t for t in recorded_tasks([plain, fim, chat, js], exclude_record_ids=set())}
    assert set(tasks) == {plain.prompt, fim.prompt}  # chat and non-Python contexts are left out

    plain_task, fim_task = tasks[plain.prompt], tasks[fim.prompt]
    assert plain_task.suffix == "" and plain_task.program(" 1") == "def plain():\n    return 1"
    assert fim_task.suffix == "\n\nx = 1\n"
    assert fim_task.program("1") == "def fim():\n    return 1\n\nx = 1\n"

    # The generator sees the empty suffix as none: a plain prompt, no FIM tokens, like the server.
    tokens = FakeEngine()
    as_task = prepare_request(GenerationRequest(plain_task.prompt, plain_task.suffix), tokens)
    assert as_task == prepare_request(GenerationRequest(plain.prompt, None), tokens)
    assert tokens.special_token_id("<|fim_prefix|>") not in as_task.prompt_token_ids
    as_fim = prepare_request(GenerationRequest(fim_task.prompt, fim_task.suffix), tokens)
    assert as_fim.prompt_token_ids[0] == tokens.special_token_id("<|fim_prefix|>")


# -- run_gate with a scripted generator -------------------------------------------------------

TOY = [
    Task(
        task_id=f"toy/{i}",
        source="mbpp",
        prompt=f"def shift_{i}(a):\n",
        suffix="\n",
        test=f"assert shift_{i}(10) == {10 + i}\n",
    )
    for i in range(1, 13)
]
RIGHT = {t.prompt: f"    return a + {i}" for i, t in enumerate(TOY, start=1)}
WRONG = {t.prompt: f"    return a - {i}" for i, t in enumerate(TOY, start=1)}


class ScriptedGenerator:
    """Right code for the adapters in ``good`` (paths; None: the base model), wrong for the
    others, or right on some prompts only (``good`` maps an adapter to them); ``right_samples``
    makes only the first that many of ``n`` samples right. Records every call's adapter and
    prompts, and the sampling (n, temperature, seed) in ``sampling``."""

    def __init__(
        self,
        good: set[str | None] | dict[str | None, set[str]],
        fail: Exception | None = None,
        right_samples: int | None = None,
    ) -> None:
        self.good = good
        self.fail = fail
        self.right_samples = right_samples
        self.calls: list[tuple[str | None, list[str]]] = []
        self.sampling: list[tuple[int, float, int | None]] = []

    def _right(self, key: str | None, prompt: str) -> bool:
        if isinstance(self.good, dict):
            return prompt in self.good.get(key, set())
        return key in self.good

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        adapter: str | Path | None = None,
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = 0,
        progress: bool = False,
        **_: Any,
    ) -> list[list[str]]:
        if self.fail is not None:
            raise self.fail
        key = str(adapter) if adapter is not None else None
        self.calls.append((key, [r.prompt for r in requests]))
        self.sampling.append((n, temperature, seed))
        out = []
        for r in requests:
            if not self._right(key, r.prompt):
                out.append([WRONG[r.prompt]] * n)
                continue
            right = n if self.right_samples is None else self.right_samples
            out.append([RIGHT[r.prompt]] * right + [WRONG[r.prompt]] * (n - right))
        return out


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout_s=15.0, cpu_s=2), workers=2)


def _register(
    factory: sessionmaker[Session], name: str, root: Path, manifest: dict[str, Any] | None = None
) -> str:
    path = root / name
    path.mkdir(parents=True)
    with factory() as session:
        registry.register_adapter(
            session=session,
            name=name,
            path=str(path),
            base_sha256="b" * 64,
            manifest=manifest or {},
            parent_id=None,
            round_id=None,
            actor="trainer",
        )
    return str(path)


def _activate(factory: sessionmaker[Session], name: str) -> None:
    with factory() as session:
        adapter = registry.get_adapter(session=session, name=name)
        assert adapter is not None
        for state in ("evaluating", "approved", "active"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")


def _trail(factory: sessionmaker[Session], name: str) -> list[tuple[str | None, str, str]]:
    with factory() as session:
        adapter = registry.get_adapter(session=session, name=name)
        assert adapter is not None
        return [
            (t.from_state, t.to_state, t.actor)
            for t in registry.history(session=session, adapter_id=adapter.id)
        ]


def _gate(
    factory: sessionmaker[Session], name: str, generator: Any, sandbox: Sandbox, **kw: Any
) -> GateResult:
    return run_gate(
        session_factory=factory,
        adapter_name=name,
        generator=generator,
        sandbox=sandbox,
        mbpp_path=MBPP_PATH,
        suites=kw.pop("suites", {"toy": TOY}),
        config=kw.pop("config", GREEDY),
        progress=False,
        **kw,
    )


def test_a_better_candidate_is_approved_with_its_evaluation_stored(
    session_factory: sessionmaker[Session],
    sandbox: Sandbox,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _register(session_factory, "kaizen-r1-good", tmp_path)
    generator = ScriptedGenerator(good={path})
    with caplog.at_level(logging.INFO, logger="trainer.gate"):
        result = _gate(
            session_factory, "kaizen-r1-good", generator, sandbox, config=WITH_EXECUTABILITY
        )

    assert result.decision == "approved", result.reasons
    assert result.baseline is None
    toy = result.comparisons["toy"]
    assert (toy.n, toy.base_passed, toy.candidate_passed, toy.wins, toy.losses) == (
        12,
        0,
        12,
        12,
        0,
    )
    assert result.pooled == {
        "problems": 12,
        "gain_points": 100.0,
        "lower_points": 100.0,
        "level": pytest.approx(0.004),
    }
    assert result.bounds["toy"]["judged"] is True
    assert result.reasons == [
        "pooled +100.0 points over 12 problems, lower bound +100.0 at 99.6% "
        "(family alpha 0.04 over 10 rounds)"
    ]
    assert result.task_ids == {"toy": [t.task_id for t in TOY]}
    # Both sides on exactly the same task list: the base model first, then the candidate.
    prompts = [t.prompt for t in TOY]
    assert generator.calls == [(None, prompts), (path, prompts)]

    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="kaizen-r1-good")
        assert adapter is not None and adapter.state == "approved"
        evaluation = adapter.evaluation
    assert evaluation is not None
    assert evaluation["decision"] == "approved" and evaluation["baseline"] is None
    assert evaluation["comparisons"]["toy"]["wins"] == 12
    assert evaluation["pooled"]["lower_points"] == 100.0
    assert evaluation["bounds"]["toy"]["problems"] == 12
    assert evaluation["task_ids"] == {"toy": [t.task_id for t in TOY]}
    assert evaluation["pass_rates"] == {"toy": {"baseline": 0.0, "candidate": 1.0}}
    # The baseline's wrong answers still run: executable, beside a pass rate of 0.
    assert evaluation["executability_rates"] == {"toy": {"baseline": 1.0, "candidate": 1.0}}
    assert evaluation["passed"]["toy"]["candidate"] == [True] * 12
    assert set(evaluation["durations_s"]) == {"baseline/toy", "candidate/toy", "total"}
    assert evaluation["config"]["margin_points"] == 0.0
    assert evaluation["config"]["alpha"] == pytest.approx(0.004)
    assert _trail(session_factory, "kaizen-r1-good") == [
        (None, "candidate", "trainer"),
        ("candidate", "evaluating", "gate"),
        ("evaluating", "approved", "gate"),
    ]
    assert "event=gate_suite adapter=kaizen-r1-good baseline=None suite=toy problems=12" in (
        caplog.text
    )
    assert "event=gate_decision adapter=kaizen-r1-good" in caplog.text


def test_a_worse_candidate_is_rejected_and_the_active_adapter_is_the_baseline(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    active_path = _register(session_factory, "kaizen-r1", tmp_path)
    _activate(session_factory, "kaizen-r1")
    candidate_path = _register(session_factory, "kaizen-r2", tmp_path)
    generator = ScriptedGenerator(good={active_path})
    result = _gate(session_factory, "kaizen-r2", generator, sandbox, actor="ops:alice")

    assert result.decision == "rejected"
    assert result.baseline == "kaizen-r1"
    assert [adapter for adapter, _ in generator.calls] == [active_path, candidate_path]
    assert result.comparisons["toy"].losses == 12
    assert result.reasons[0].startswith("pooled -100.0 points over 12 problems")
    assert "toy may be worse: -100.0 points, lower bound -100.0 at 95% is below -5.0" in (
        result.reasons
    )
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="kaizen-r2")
        assert adapter is not None and adapter.state == "rejected"
        assert adapter.evaluation is not None and adapter.evaluation["baseline"] == "kaizen-r1"
        last = registry.history(session=session, adapter_id=adapter.id)[-1]
        assert (last.to_state, last.actor) == ("rejected", "ops:alice")
        assert "toy may be worse" in last.reason and "pooled -100.0" in last.reason
        active = registry.active_adapter(session=session)
        assert active is not None and active.name == "kaizen-r1"  # untouched

    # A better one against the same active adapter is approved.
    better = _register(session_factory, "kaizen-r3", tmp_path)
    result = _gate(session_factory, "kaizen-r3", ScriptedGenerator(good={better}), sandbox)
    assert (result.decision, result.baseline) == ("approved", "kaizen-r1")


def test_on_the_toy_task_no_gain_is_rejected_and_a_clear_gain_approved(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    prompts = [t.prompt for t in TOY]
    active = _register(session_factory, "kaizen-r1", tmp_path)
    _activate(session_factory, "kaizen-r1")
    # Different tasks right, as many of them: no gain.
    same = _register(session_factory, "kaizen-r2", tmp_path)
    generator = ScriptedGenerator(good={active: set(prompts[:6]), same: set(prompts[6:])})
    result = _gate(session_factory, "kaizen-r2", generator, sandbox)
    assert result.decision == "rejected"
    assert result.pooled["gain_points"] == 0.0 and result.pooled["lower_points"] < 0
    # Four right for the baseline, all twelve for the candidate: approved.
    better = _register(session_factory, "kaizen-r3", tmp_path)
    generator = ScriptedGenerator(good={active: set(prompts[:4]), better: set(prompts)})
    result = _gate(session_factory, "kaizen-r3", generator, sandbox)
    assert result.decision == "approved", result.reasons
    assert result.pooled["gain_points"] == pytest.approx(66.6667, abs=1e-3)
    assert 0 < result.pooled["lower_points"] < 66


def test_samples_are_drawn_per_task_fresh_each_round_and_scored_as_shares(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    four = GateConfig(samples=4, temperature=0.8, ni_min_tasks=50)
    first = _register(session_factory, "kaizen-r1", tmp_path)
    # The candidate's first 3 of 4 samples are right, the base model's none.
    generator = ScriptedGenerator(good={first}, right_samples=3)
    result = _gate(session_factory, "kaizen-r1", generator, sandbox, config=four)
    # One request per task with n=4, not four requests: vLLM shares the prompt's cache.
    assert [len(prompts) for _, prompts in generator.calls] == [12, 12]
    (n, temperature, seed), again = generator.sampling
    assert (n, temperature) == (4, 0.8) and again == (n, temperature, seed)  # both sides alike
    assert result.pass_rates["toy"] == {"baseline": 0.0, "candidate": 0.75}
    assert result.pooled["gain_points"] == 75.0 and result.pooled["problems"] == 12
    assert result.comparisons["toy"].n == 48  # samples, for reading
    assert result.decision == "approved", result.reasons
    # The next round (another candidate) samples afresh.
    second = _register(session_factory, "kaizen-r2", tmp_path)
    generator2 = ScriptedGenerator(good={second}, right_samples=3)
    _gate(session_factory, "kaizen-r2", generator2, sandbox, config=four)
    assert generator2.sampling[0][2] != seed


def test_limit_takes_the_same_seeded_subset_for_both_sides(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    path = _register(session_factory, "kaizen-r1", tmp_path)
    generator = ScriptedGenerator(good={path})
    config = GateConfig(limit=6, seed=3)
    result = _gate(session_factory, "kaizen-r1", generator, sandbox, config=config)
    ids = result.task_ids["toy"]
    assert len(ids) == 6 and ids == sorted(ids, key=[t.task_id for t in TOY].index)
    (_, base_prompts), (_, candidate_prompts) = generator.calls
    assert base_prompts == candidate_prompts and len(base_prompts) == 6
    # The subset depends on the seed and the ids, not on the order the tasks come in.
    again = _register(session_factory, "kaizen-r2", tmp_path)
    reversed_suite = {"toy": list(reversed(TOY))}
    result2 = _gate(
        session_factory,
        "kaizen-r2",
        ScriptedGenerator(good={again}),
        sandbox,
        config=config,
        suites=reversed_suite,
    )
    assert sorted(result2.task_ids["toy"]) == sorted(ids)


def test_only_candidates_are_gated(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    _register(session_factory, "kaizen-r1", tmp_path)
    _activate(session_factory, "kaizen-r1")
    generator = ScriptedGenerator(good=set())
    with pytest.raises(ValueError, match="kaizen-r1 is active, not candidate"):
        _gate(session_factory, "kaizen-r1", generator, sandbox)
    with pytest.raises(LookupError, match="no adapter named 'nope'"):
        _gate(session_factory, "nope", generator, sandbox)
    assert generator.calls == []
    assert _trail(session_factory, "kaizen-r1")[-1][1] == "active"


def test_a_failed_evaluation_puts_the_adapter_back_to_candidate(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    _register(session_factory, "kaizen-r1", tmp_path)
    generator = ScriptedGenerator(good=set(), fail=RuntimeError("engine died"))
    with pytest.raises(RuntimeError, match="engine died"):
        _gate(session_factory, "kaizen-r1", generator, sandbox)
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="kaizen-r1")
        assert adapter is not None and adapter.state == "candidate"
        assert adapter.evaluation is None
        last = registry.history(session=session, adapter_id=adapter.id)[-1]
        assert last.reason == "evaluation failed: RuntimeError: engine died"
    assert [s for _, s, _ in _trail(session_factory, "kaizen-r1")] == [
        "candidate",
        "evaluating",
        "candidate",
    ]
    # It can be gated again.
    generator.fail = None
    assert _gate(session_factory, "kaizen-r1", generator, sandbox).decision == "rejected"


def _save_recorded(session: Session, name: str, good: str, bad: str, test: str) -> list[str]:
    """A completion that failed in CI and one that passed, for the context ``def <name>(a):``;
    returns their record ids."""
    ids = []
    for verdict, text in (("failed", bad), ("passed", good)):
        cid = f"cmpl-{name}-{verdict}"
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
                    prompt=f"def {name}(a):\n",
                    suffix="\n",
                    params={},
                    stream=False,
                    context={"language": "python", "file_path": "m.py", "repository": "r"},
                    choices=[ChoiceRecord(index=0, text=text, tokens=4)],
                )
            ],
        )
        save_outcome(
            session=session,
            run={
                "run_id": f"ci:{cid}",
                "repository": "r",
                "commit": "c",
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
        ids.append(f"{cid}:0:ci:{cid}")
    return ids


def test_the_recorded_suite_holds_out_the_candidates_training_records(
    session_factory: sessionmaker[Session], sandbox: Sandbox, tmp_path: Path
) -> None:
    trained: list[str] = []
    with session_factory() as session:
        for i, task in enumerate(TOY, start=1):
            ids = _save_recorded(
                session, f"shift_{i}", RIGHT[task.prompt], WRONG[task.prompt], task.test
            )
            if i <= 2:
                trained += ids
    path = _register(session_factory, "kaizen-r1", tmp_path, manifest={"record_ids": trained})
    generator = ScriptedGenerator(good={path})
    result = run_gate(
        session_factory=session_factory,
        adapter_name="kaizen-r1",
        generator=generator,
        sandbox=sandbox,
        mbpp_path=MBPP_PATH,
        config=GateConfig(suites=("recorded",), samples=1, temperature=0.0),
        progress=False,
    )
    held_out = {t.prompt for t in TOY[2:]}
    ids = result.task_ids["recorded"]
    assert len(ids) == 10 and all(i.startswith("recorded/") for i in ids) and ids == sorted(ids)
    assert {p for p in generator.calls[0][1]} == held_out
    assert result.comparisons["recorded"].wins == 10
    assert result.decision == "approved", result.reasons
    assert result.bounds["recorded"]["judged"] is True  # 10 recorded problems: bounded too


# -- the real engine --------------------------------------------------------------------------

# Eight FIM tasks whose answer is one digit; a "good" adapter is trained on the right digits, a
# "bad" one on the same pairs swapped (it learns to answer 1). With lr 1e-2 and 40 steps both
# answered as trained, greedily, on 8 of 8 tasks for each of 4 seeds (25 steps did too; lr 5e-3
# needed 40 steps, 30 were not enough), and the random base model writes garbage (0 of 8).
ENGINE_NAMES = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
ENGINE_RIGHT = (7, 3, 5, 2, 8, 4, 9, 6)
ENGINE_WRONG = 1
ENGINE_TASKS = [
    Task(
        task_id=f"digits/{name}",
        source="mbpp",
        prompt=f"def {name}():\n    return ",
        suffix="\n",
        test=f"assert {name}() == {right}\n",
    )
    for name, right in zip(ENGINE_NAMES, ENGINE_RIGHT, strict=True)
]


@dataclass
class Trained:
    generator: Any  # trainer.generate.VllmGenerator
    good: Path
    bad: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    import torch

    from server.engine.fim import FimFormat
    from tests.utils.tiny_model import build_tiny_model
    from trainer.config import TrainConfig
    from trainer.generate import VllmGenerator
    from trainer.train import Pair, train_adapter

    root = tmp_path_factory.mktemp("gate")
    model_dir = build_tiny_model(root / "model")
    config = TrainConfig(
        batch_size=8,
        max_steps=40,
        warmup_steps=0,
        learning_rate=1e-2,
        lora_r=8,
        lora_alpha=16,
        max_length=64,
        gradient_checkpointing=False,
        save_steps=1000,
    )
    fim = FimFormat()
    adapters = {}
    threads = torch.get_num_threads()
    # One thread, as in tests/trainer/test_train.py: on shared cores OpenMP's spinning threads
    # slow training, and the engine's start beside them, many times over.
    torch.set_num_threads(1)
    try:
        for kind in ("good", "bad"):
            pairs = []
            for task, right in zip(ENGINE_TASKS, ENGINE_RIGHT, strict=True):
                chosen, rejected = str(right), str(ENGINE_WRONG)
                if kind == "bad":
                    chosen, rejected = rejected, chosen
                prompt = fim.build(task.prompt, task.suffix)  # as the model sees the request
                pairs.append(Pair(task.task_id, prompt, chosen, rejected, "ci"))
            result = train_adapter(
                base_model_dir=model_dir,
                pairs=pairs,
                config=config,
                output_dir=root / kind,
                progress=False,
            )
            assert result.adapter_dir is not None, result.stopped_reason
            adapters[kind] = result.adapter_dir
        with VllmGenerator(
            model_dir, max_model_len=256, max_lora_rank=8, kv_cache_gib=0.0625, enforce_eager=True
        ) as generator:
            yield Trained(generator, adapters["good"], adapters["bad"])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.engine
def test_the_gate_with_the_real_engine_approves_the_better_adapter_only(
    trained: Trained, session_factory: sessionmaker[Session], sandbox: Sandbox
) -> None:
    for name, path in (("kaizen-good", trained.good), ("kaizen-bad", trained.bad)):
        with session_factory() as session:
            registry.register_adapter(
                session=session,
                name=name,
                path=str(path),
                base_sha256="b" * 64,
                manifest={},
                parent_id=None,
                round_id=None,
                actor="trainer",
            )
    # Greedy, and the veto judged on these 8 tasks (fewer than the default ni_min_tasks).
    config = GateConfig(max_tokens=8, samples=1, temperature=0.0, ni_min_tasks=8)

    def gate(name: str) -> GateResult:
        return run_gate(
            session_factory=session_factory,
            adapter_name=name,
            generator=trained.generator,
            sandbox=sandbox,
            mbpp_path=MBPP_PATH,
            config=config,
            suites={"digits": ENGINE_TASKS},
            progress=False,
        )

    good = gate("kaizen-good")
    assert good.decision == "approved", good.reasons
    assert good.baseline is None
    assert good.pass_rates["digits"] == {"baseline": 0.0, "candidate": 1.0}

    _activate_from_approved(session_factory, "kaizen-good")
    bad = gate("kaizen-bad")
    assert bad.decision == "rejected", bad.reasons
    assert bad.baseline == "kaizen-good"
    assert bad.pass_rates["digits"] == {"baseline": 1.0, "candidate": 0.0}
    assert any(r.startswith("digits may be worse: -100.0 points") for r in bad.reasons)
    with session_factory() as session:
        states = {a.name: a.state for a in registry.list_adapters(session=session)}
    assert states == {"kaizen-good": "active", "kaizen-bad": "rejected"}


def _activate_from_approved(factory: sessionmaker[Session], name: str) -> None:
    with factory() as session:
        adapter = registry.get_adapter(session=session, name=name)
        assert adapter is not None and adapter.state == "approved"
        registry.transition(session=session, adapter=adapter, to_state="active", actor="test")


# -- after a round: gate, then canary -----------------------------------------------------------


@pytest.mark.parametrize("auto_rollout", [True, False])
def test_an_approved_candidate_becomes_the_canary_unless_rollout_is_paused(
    session_factory: sessionmaker[Session],
    settings: Any,
    tmp_path: Path,
    auto_rollout: bool,
) -> None:
    from server.store.rollout import set_rollout_state
    from trainer.handoff import gate_and_canary

    path = _register(session_factory, "kaizen-r1-good", tmp_path)
    with session_factory() as session:
        set_rollout_state(session=session, actor="ops", auto_rollout=auto_rollout)

    class Closing(ScriptedGenerator):
        closed = False

        def close(self) -> None:
            self.closed = True

    generator = Closing(good={path})
    out = gate_and_canary(
        settings.model_copy(update={"gate_samples": 1, "gate_temperature": 0.0}),
        session_factory,
        "kaizen-r1-good",
        lambda: generator,
        progress=False,
        suites={"toy": TOY},
    )
    assert out["decision"] == "approved" and generator.closed
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="kaizen-r1-good")
        assert adapter is not None
        if auto_rollout:
            assert out["changes"] == ["kaizen-r1-good is the canary"]
            assert adapter.state == "canary"
            assert _trail(session_factory, "kaizen-r1-good")[-1] == (
                "approved",
                "canary",
                "trainer",
            )
        else:
            assert "promote it by hand" in out["changes"][0]
            assert adapter.state == "approved"


def test_a_rejected_candidate_goes_nowhere(
    session_factory: sessionmaker[Session], settings: Any, tmp_path: Path
) -> None:
    from trainer.handoff import gate_and_canary

    _register(session_factory, "kaizen-r1-bad", tmp_path)
    out = gate_and_canary(
        settings.model_copy(update={"gate_samples": 1, "gate_temperature": 0.0}),
        session_factory,
        "kaizen-r1-bad",
        lambda: _NoClose(good=set()),
        progress=False,
        suites={"toy": TOY},
    )
    assert out["decision"] == "rejected" and out["changes"] == []


class _NoClose(ScriptedGenerator):
    def close(self) -> None:
        pass
