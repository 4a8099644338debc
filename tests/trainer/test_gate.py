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

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.store import adapters as registry
from server.store.completions import ChoiceRecord, CompletionRecord, save_completions
from server.store.feedback import save_outcome
from tests.utils.fake_engine import FakeEngine
from trainer.evaluate import Comparison, mcnemar_exact
from trainer.gate import GateConfig, GateResult, decide, recorded_tasks, run_gate
from trainer.generate import GenerationRequest, prepare_request
from trainer.records import OutcomeRecord, context_key
from trainer.sandbox import Sandbox, SandboxLimits
from trainer.tasks import Task

MBPP_PATH = Path("unused.jsonl")  # toy suites only: no MBPP task is loaded

# -- decide -----------------------------------------------------------------------------------


def _c(suite: str, n: int, base: int, cand: int, wins: int, losses: int) -> Comparison:
    return Comparison(suite, n, base, cand, wins, losses, mcnemar_exact(wins, losses))


def test_decide_approves_a_significant_gain() -> None:
    comparisons = {
        "recorded": _c("recorded", 50, 20, 30, 12, 2),
        "humaneval": _c("humaneval", 50, 25, 25, 3, 3),
    }
    decision, reasons, pooled = decide(comparisons, GateConfig())
    assert decision == "approved", reasons
    assert pooled == Comparison("pooled", 100, 45, 55, 15, 5, mcnemar_exact(15, 5))
    assert pooled.delta_points == pytest.approx(10.0)
    assert reasons == ["pooled +10.0 points (wins 15, losses 5, p=0.0414, n=100)"]


def test_decide_rejects_a_gain_below_the_margin() -> None:
    comparisons = {"mbpp_dev": _c("mbpp_dev", 100, 40, 50, 12, 2)}
    decision, reasons, _ = decide(comparisons, GateConfig(margin_points=15.0))
    assert decision == "rejected"
    assert "pooled gain +10.0 points is below the margin of 15.0" in reasons


def test_decide_rejects_a_gain_that_is_not_significant() -> None:
    comparisons = {"mbpp_dev": _c("mbpp_dev", 10, 2, 5, 3, 0)}  # +30 points on 3 tasks
    decision, reasons, pooled = decide(comparisons, GateConfig())
    assert decision == "rejected"
    assert pooled.p_value == 0.25
    assert reasons == [
        "pooled +30.0 points (wins 3, losses 0, p=0.25, n=10)",
        "p=0.25 is not below alpha=0.05",
    ]


def test_decide_rejects_a_public_suite_loss_even_when_the_pool_wins() -> None:
    comparisons = {
        "recorded": _c("recorded", 100, 30, 60, 30, 0),
        "humaneval": _c("humaneval", 125, 60, 57, 0, 3),
    }
    decision, reasons, pooled = decide(comparisons, GateConfig())
    assert pooled.delta_points > 10 and pooled.p_value < 1e-5
    assert decision == "rejected"
    assert reasons[1:] == ["humaneval lost 2.4 points (> 1.0)"]
    # Within the allowance it passes; a loss on the recorded tasks is no veto.
    assert decide(comparisons, GateConfig(max_loss_points=2.5))[0] == "approved"
    recorded_loss = {
        "recorded": _c("recorded", 100, 50, 45, 0, 5),
        "mbpp_dev": _c("mbpp_dev", 100, 30, 60, 30, 0),
    }
    assert decide(recorded_loss, GateConfig())[0] == "approved"


def test_decide_ignores_suites_without_tasks() -> None:
    comparisons = {"mbpp_dev": _c("mbpp_dev", 100, 40, 50, 12, 2)}
    with_empty = {**comparisons, "recorded": _c("recorded", 0, 0, 0, 0, 0)}
    decision, reasons, pooled = decide(with_empty, GateConfig())
    assert (decision, pooled) == decide(comparisons, GateConfig())[::2]
    assert decision == "approved" and "recorded: no tasks, ignored" in reasons
    decision, reasons, pooled = decide({"recorded": _c("recorded", 0, 0, 0, 0, 0)}, GateConfig())
    assert decision == "rejected" and pooled.n == 0 and "no tasks to evaluate" in reasons


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"suites": ()}, "suites is empty"),
        ({"suites": ("nope",)}, r"\['nope'\] cannot gate; use recorded"),
        ({"suites": ("mbpp_test",)}, "held-out set"),
        ({"suites": ("humaneval", "humaneval")}, "twice"),
        ({"limit": -1}, "limit"),
        ({"alpha": 0.0}, "alpha"),
        ({"margin_points": -1.0}, "margin_points"),
        ({"max_loss_points": -0.5}, "max_loss_points"),
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
    for i in range(1, 9)
]
RIGHT = {t.prompt: f"    return a + {i}" for i, t in enumerate(TOY, start=1)}
WRONG = {t.prompt: f"    return a - {i}" for i, t in enumerate(TOY, start=1)}


class ScriptedGenerator:
    """Right code for the adapters in ``good`` (paths; None: the base model), wrong for the
    others; records every call's adapter and prompts."""

    def __init__(self, good: set[str | None], fail: Exception | None = None) -> None:
        self.good = good
        self.fail = fail
        self.calls: list[tuple[str | None, list[str]]] = []

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
        script = RIGHT if key in self.good else WRONG
        return [[script[r.prompt]] * n for r in requests]


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
        result = _gate(session_factory, "kaizen-r1-good", generator, sandbox)

    assert result.decision == "approved", result.reasons
    assert result.baseline is None
    toy = result.comparisons["toy"]
    assert (toy.n, toy.base_passed, toy.candidate_passed, toy.wins, toy.losses) == (8, 0, 8, 8, 0)
    assert result.pooled.suite == "pooled" and result.pooled.wins == 8
    assert result.reasons == ["pooled +100.0 points (wins 8, losses 0, p=0.00781, n=8)"]
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
    assert evaluation["comparisons"]["toy"]["wins"] == 8
    assert evaluation["comparisons"]["toy"]["delta_points"] == 100.0
    assert evaluation["pooled"]["p_value"] == pytest.approx(2 * 0.5**8)
    assert evaluation["task_ids"] == {"toy": [t.task_id for t in TOY]}
    assert evaluation["pass_rates"] == {"toy": {"baseline": 0.0, "candidate": 1.0}}
    assert evaluation["passed"]["toy"]["candidate"] == [True] * 8
    assert set(evaluation["durations_s"]) == {"baseline/toy", "candidate/toy", "total"}
    assert evaluation["config"]["margin_points"] == 1.0
    assert _trail(session_factory, "kaizen-r1-good") == [
        (None, "candidate", "trainer"),
        ("candidate", "evaluating", "gate"),
        ("evaluating", "approved", "gate"),
    ]
    assert "event=gate_suite adapter=kaizen-r1-good baseline=None suite=toy n=8" in caplog.text
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
    assert result.comparisons["toy"].losses == 8
    assert result.reasons[0].startswith("pooled -100.0 points (wins 0, losses 8")
    assert "toy lost 100.0 points (> 1.0)" in result.reasons
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name="kaizen-r2")
        assert adapter is not None and adapter.state == "rejected"
        assert adapter.evaluation is not None and adapter.evaluation["baseline"] == "kaizen-r1"
        last = registry.history(session=session, adapter_id=adapter.id)[-1]
        assert (last.to_state, last.actor) == ("rejected", "ops:alice")
        assert "toy lost 100.0 points" in last.reason and "pooled -100.0" in last.reason
        active = registry.active_adapter(session=session)
        assert active is not None and active.name == "kaizen-r1"  # untouched

    # A better one against the same active adapter is approved.
    better = _register(session_factory, "kaizen-r3", tmp_path)
    result = _gate(session_factory, "kaizen-r3", ScriptedGenerator(good={better}), sandbox)
    assert (result.decision, result.baseline) == ("approved", "kaizen-r1")


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
        config=GateConfig(suites=("recorded",)),
        progress=False,
    )
    held_out = {t.prompt for t in TOY[2:]}
    ids = result.task_ids["recorded"]
    assert len(ids) == 6 and all(i.startswith("recorded/") for i in ids) and ids == sorted(ids)
    assert {p for p in generator.calls[0][1]} == held_out
    assert result.comparisons["recorded"].wins == 6
    assert result.decision == "approved", result.reasons  # 6 wins, 0 losses: p = 0.03125


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

    from server.services.fim import FimFormat
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
    config = GateConfig(max_tokens=8)

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
    assert "digits lost 100.0 points (> 1.0)" in bad.reasons
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
    from trainer.worker import gate_and_canary

    path = _register(session_factory, "kaizen-r1-good", tmp_path)
    with session_factory() as session:
        set_rollout_state(session=session, actor="ops", auto_rollout=auto_rollout)

    class Closing(ScriptedGenerator):
        closed = False

        def close(self) -> None:
            self.closed = True

    generator = Closing(good={path})
    out = gate_and_canary(
        settings,
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
    from trainer.worker import gate_and_canary

    _register(session_factory, "kaizen-r1-bad", tmp_path)
    out = gate_and_canary(
        settings,
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
