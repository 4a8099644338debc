"""The evaluation gate: a candidate adapter reaches users only if it is measurably better than
the active adapter (or the base model when none is active).

Both sides run greedy pass@1 on exactly the same task lists (held-out recorded tasks and the
public suites), the paired results are pooled, and the candidate is approved only when the pooled
gain reaches ``margin_points``, the pooled exact McNemar test is below ``alpha``, and no public
suite loses more than ``max_loss_points``. The decision, its reasons and every number behind it
are stored on the adapter (``Adapter.evaluation``) and in the registry's audit trail.

Example::

    with VllmGenerator(model_dir) as generator:
        result = run_gate(
            session_factory=factory,
            adapter_name="kaizen-r12-1a2b3c4d",
            generator=generator,
            sandbox=Sandbox(),
            mbpp_path=Path("data/mbppplus.jsonl"),
        )
    print(result.decision, result.reasons)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.store import adapters as registry
from server.store.models import Adapter
from trainer.evaluate import (
    SUITES,
    Comparison,
    EvalResult,
    Generator,
    compare,
    evaluate,
    load_suite,
    mcnemar_exact,
)
from trainer.pairs import Context
from trainer.records import OutcomeRecord, load_outcome_records
from trainer.sandbox import Sandbox
from trainer.tasks import Task

__all__ = ["GATE_SUITES", "GateConfig", "GateResult", "decide", "recorded_tasks", "run_gate"]

log = logging.getLogger(__name__)

RECORDED = "recorded"
# mbpp_train is simulated traffic (trained on) and mbpp_test the loop benchmark's held-out
# split: the gate deciding on either would leak into what it is judged by.
GATE_SUITES = (RECORDED, "mbpp_dev", "humaneval", "humaneval_fim")


@dataclass
class GateConfig:
    """What the gate evaluates and how much better a candidate must be."""

    suites: tuple[str, ...] = field(
        default=GATE_SUITES,
        metadata={
            "help": "Suites to evaluate: 'recorded' (held-out recorded tasks with tests), "
            "'mbpp_dev', 'humaneval', 'humaneval_fim'."
        },
    )
    limit: int = field(
        default=0,
        metadata={"help": "Tasks per suite, a seeded subset (0: all); for quick CPU runs."},
    )
    margin_points: float = field(
        default=1.0,
        metadata={"help": "Pooled pass@1 gain required, in percentage points."},
    )
    alpha: float = field(
        default=0.05,
        metadata={"help": "The pooled exact McNemar p-value must be below this."},
    )
    max_loss_points: float = field(
        default=1.0,
        metadata={"help": "No public suite (all but 'recorded') may lose more points than this."},
    )
    max_tokens: int = field(default=384, metadata={"help": "Tokens per completion."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset that `limit` takes."})

    def __post_init__(self) -> None:
        self.suites = tuple(self.suites)
        if not self.suites:
            raise ValueError(f"suites is empty; name at least one of {', '.join(GATE_SUITES)}.")
        unknown = [s for s in self.suites if s not in GATE_SUITES]
        if unknown:
            why = ""
            if any(s in SUITES for s in unknown):
                why = " (mbpp_train is trained on, mbpp_test is the loop benchmark's held-out set)"
            raise ValueError(f"suites {unknown} cannot gate{why}; use {', '.join(GATE_SUITES)}.")
        if len(set(self.suites)) != len(self.suites):
            raise ValueError(f"suites lists a suite twice: {self.suites}.")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0: all tasks), got {self.limit}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.margin_points < 0:
            raise ValueError(f"margin_points must be >= 0, got {self.margin_points}.")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}; 0.05 is usual.")
        if self.max_loss_points < 0:
            raise ValueError(f"max_loss_points must be >= 0, got {self.max_loss_points}.")


@dataclass
class GateResult:
    """What the gate decided and on what; :meth:`to_json` is stored in ``Adapter.evaluation``."""

    decision: str  # "approved" | "rejected"
    reasons: list[str]
    baseline: str | None  # the adapter the candidate was compared with; None: the base model
    comparisons: dict[str, Comparison]  # per suite
    pooled: Comparison  # all suites' tasks together (suite "pooled")
    task_ids: dict[str, list[str]]  # the fixed task lists of this run, per suite
    # Per suite: {"baseline": pass@1, "candidate": pass@1}.
    pass_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    # "baseline/<suite>", "candidate/<suite>" and "total", in seconds.
    durations_s: dict[str, float] = field(default_factory=dict)

    @property
    def approved(self) -> bool:
        return self.decision == "approved"

    def to_json(self) -> dict[str, Any]:
        def comparison(c: Comparison) -> dict[str, Any]:
            return {**asdict(c), "delta_points": round(c.delta_points, 4)}

        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "baseline": self.baseline,
            "comparisons": {s: comparison(c) for s, c in self.comparisons.items()},
            "pooled": comparison(self.pooled),
            "task_ids": {s: list(ids) for s, ids in self.task_ids.items()},
            "pass_rates": self.pass_rates,
            "durations_s": self.durations_s,
        }


# -- tasks ------------------------------------------------------------------------------------


def _record_id(record: OutcomeRecord) -> str:
    # As trainer.round writes a candidate's manifest["record_ids"].
    return f"{record.completion_id}:{record.choice_index}:{record.run_id}"


def recorded_tasks(records: Sequence[OutcomeRecord], *, exclude_record_ids: set[str]) -> list[Task]:
    """Held-out tasks from the log: one per context (prompt + suffix) with test code, unless any
    of its records is in ``exclude_record_ids`` (the candidate trained on that context).

    The test is the newest test code (``records`` are in run order, as
    :func:`~trainer.records.load_outcome_records` returns them). A plain completion (no suffix)
    gets ``suffix=""``: ``Task.program`` then appends nothing and the generator, like the
    server, reads an empty suffix as none. Chat contexts are left out (the program of a chat
    answer is the answer alone, not prompt + completion + suffix) and so are contexts that are
    not Python (the sandbox runs Python). Sorted by task id, ``recorded/<context key[:16]>``.
    """
    grouped: dict[str, list[OutcomeRecord]] = defaultdict(list)
    for record in records:
        grouped[record.context_key].append(record)
    tasks = []
    for key, group in grouped.items():
        if any(_record_id(r) in exclude_record_ids for r in group):
            continue
        codes = [r.test_code for r in group if r.test_code]
        if not codes:
            continue
        first = group[0]
        context = Context(
            key=key,
            endpoint=first.endpoint,
            prompt=first.prompt,
            suffix=first.suffix,
            language=next((r.language for r in group if r.language), None),
            file_path=next((r.file_path for r in group if r.file_path), None),
            repository=first.repository,
            records=tuple(group),
        )
        if context.endpoint == "chat" or not context.is_python:
            continue
        tasks.append(
            Task(
                task_id=f"{RECORDED}/{key[:16]}",
                source=RECORDED,
                prompt=context.prompt,
                suffix=context.suffix or "",
                test=codes[-1],
            )
        )
    return sorted(tasks, key=lambda t: t.task_id)


def _subset(tasks: Sequence[Task], limit: int, seed: int) -> list[Task]:
    """``limit`` tasks picked by a seeded hash of their ids (the same ones whatever the input
    order), kept in their original order; all of them for ``limit == 0``."""
    if not limit or limit >= len(tasks):
        return list(tasks)
    ranked = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}\0{t.task_id}".encode()).digest())
    keep = {t.task_id for t in ranked[:limit]}
    return [t for t in tasks if t.task_id in keep]


# -- decision ---------------------------------------------------------------------------------


def _pool(comparisons: Sequence[Comparison]) -> Comparison:
    wins = sum(c.wins for c in comparisons)
    losses = sum(c.losses for c in comparisons)
    return Comparison(
        suite="pooled",
        n=sum(c.n for c in comparisons),
        base_passed=sum(c.base_passed for c in comparisons),
        candidate_passed=sum(c.candidate_passed for c in comparisons),
        wins=wins,
        losses=losses,
        p_value=mcnemar_exact(wins, losses),
    )


def decide(
    comparisons: Mapping[str, Comparison], config: GateConfig
) -> tuple[str, list[str], Comparison]:
    """``(decision, reasons, pooled)``: approved iff the pooled gain is at least
    ``margin_points``, the pooled exact McNemar p-value is below ``alpha``, and no public suite
    (all but ``recorded``) lost more than ``max_loss_points``. Suites without tasks are ignored."""
    used = {name: c for name, c in comparisons.items() if c.n > 0}
    pooled = _pool(list(used.values()))
    reasons = [
        f"pooled {pooled.delta_points:+.1f} points (wins {pooled.wins}, losses {pooled.losses}, "
        f"p={pooled.p_value:.3g}, n={pooled.n})"
    ]
    reasons += [f"{name}: no tasks, ignored" for name in comparisons if name not in used]
    ok = True
    if not used:
        reasons.append("no tasks to evaluate")
        ok = False
    if pooled.delta_points < config.margin_points:
        reasons.append(
            f"pooled gain {pooled.delta_points:+.1f} points is below the margin of "
            f"{config.margin_points:.1f}"
        )
        ok = False
    if not pooled.p_value < config.alpha:
        reasons.append(f"p={pooled.p_value:.3g} is not below alpha={config.alpha:g}")
        ok = False
    for name, c in used.items():
        if name != RECORDED and -c.delta_points > config.max_loss_points:
            reasons.append(
                f"{name} lost {-c.delta_points:.1f} points (> {config.max_loss_points:.1f})"
            )
            ok = False
    return ("approved" if ok else "rejected"), reasons, pooled


# -- the gate ---------------------------------------------------------------------------------


def _build_suites(
    session_factory: sessionmaker[Session],
    config: GateConfig,
    manifest: Mapping[str, Any],
    mbpp_path: Path,
) -> dict[str, list[Task]]:
    suites: dict[str, list[Task]] = {}
    for name in config.suites:
        if name == RECORDED:
            with session_factory() as session:
                records = load_outcome_records(session=session)
            trained = set(manifest.get("record_ids") or [])
            suites[name] = recorded_tasks(records, exclude_record_ids=trained)
        else:
            suites[name] = load_suite(name, mbpp_path=mbpp_path)
    return suites


def _load(session: Session, name: str) -> Adapter:
    adapter = registry.get_adapter(session=session, name=name)
    if adapter is None:
        raise LookupError(f"no adapter named {name!r} in the registry (see `kaizen adapters`)")
    return adapter


def run_gate(
    *,
    session_factory: sessionmaker[Session],
    adapter_name: str,
    generator: Generator,
    sandbox: Sandbox,
    mbpp_path: Path,
    config: GateConfig | None = None,
    actor: str = "gate",
    suites: Mapping[str, Sequence[Task]] | None = None,
    progress: bool = True,
) -> GateResult:
    """Evaluate the candidate ``adapter_name`` against the active adapter (or the base model)
    and move it to ``approved`` or ``rejected``; see the module docstring.

    ``suites`` replaces the configured suites (name -> tasks; names other than ``recorded``
    count as public). While it runs the adapter is ``evaluating``; if evaluation fails it goes
    back to ``candidate`` (the error is the reason) and the error is raised. Raises ValueError
    for an adapter that is not a candidate, LookupError for an unknown name.
    """
    config = config or GateConfig()
    started = time.perf_counter()
    with session_factory() as session:
        candidate = _load(session, adapter_name)
        if candidate.state != "candidate":
            raise ValueError(
                f"adapter {adapter_name} is {candidate.state}, not candidate; the gate "
                "evaluates candidates only (a new version comes from a new training round)"
            )
        active = registry.active_adapter(session=session)
        baseline = active.name if active is not None else None
        baseline_path = Path(active.path) if active is not None else None
        candidate_path = Path(candidate.path)
        manifest = dict(candidate.manifest or {})
        registry.transition(
            session=session,
            adapter=candidate,
            to_state="evaluating",
            actor=actor,
            reason=f"gate: against {baseline or 'the base model'}",
        )
    log.info("event=gate_start adapter=%s baseline=%s", adapter_name, baseline)

    try:
        tasks = {
            name: _subset(list(ts), config.limit, config.seed)
            for name, ts in (
                suites.items()
                if suites is not None
                else _build_suites(session_factory, config, manifest, mbpp_path).items()
            )
        }
        durations: dict[str, float] = {}
        results: dict[str, dict[str, EvalResult]] = {"baseline": {}, "candidate": {}}
        for side, path in (("baseline", baseline_path), ("candidate", candidate_path)):
            for name, suite_tasks in tasks.items():
                if not suite_tasks:
                    continue
                result = evaluate(
                    generator,
                    suite_tasks,
                    suite=name,
                    sandbox=sandbox,
                    adapter=path,
                    max_tokens=config.max_tokens,
                    progress=progress,
                )
                results[side][name] = result
                durations[f"{side}/{name}"] = round(result.duration_s, 3)
        comparisons = {
            name: (
                compare(results["baseline"][name], results["candidate"][name])
                if name in results["candidate"]
                else Comparison(name, 0, 0, 0, 0, 0, 1.0)
            )
            for name in tasks
        }
        decision, reasons, pooled = decide(comparisons, config)
        durations["total"] = round(time.perf_counter() - started, 3)
        result = GateResult(
            decision=decision,
            reasons=reasons,
            baseline=baseline,
            comparisons=comparisons,
            pooled=pooled,
            task_ids={name: [t.task_id for t in ts] for name, ts in tasks.items()},
            pass_rates={
                name: {
                    "baseline": results["baseline"][name].pass_at_1,
                    "candidate": results["candidate"][name].pass_at_1,
                }
                for name in results["candidate"]
            },
            durations_s=durations,
        )
        evaluation = {
            **result.to_json(),
            "candidate": adapter_name,
            "baseline_path": str(baseline_path) if baseline_path is not None else None,
            "config": asdict(config),
            "passed": {
                name: {
                    "baseline": results["baseline"][name].passed,
                    "candidate": results["candidate"][name].passed,
                }
                for name in results["candidate"]
            },
            "finished_at": datetime.now(UTC).isoformat(),
        }
        with session_factory() as session:
            adapter = _load(session, adapter_name)
            # Committed by the transition, together: a verdict is never stored without its state.
            adapter.evaluation = evaluation
            registry.transition(
                session=session,
                adapter=adapter,
                to_state=decision,
                actor=actor,
                reason="; ".join(reasons),
            )
    except BaseException as exc:
        log.exception("event=gate_failed adapter=%s", adapter_name)
        _back_to_candidate(session_factory, adapter_name, actor, exc)
        raise

    for name, c in comparisons.items():
        log.info(
            "event=gate_suite adapter=%s baseline=%s suite=%s n=%d baseline_passed=%d "
            "candidate_passed=%d wins=%d losses=%d delta_points=%.2f p_value=%.4g",
            adapter_name,
            baseline,
            name,
            c.n,
            c.base_passed,
            c.candidate_passed,
            c.wins,
            c.losses,
            c.delta_points,
            c.p_value,
        )
    log.info(
        "event=gate_decision adapter=%s baseline=%s decision=%s delta_points=%.2f p_value=%.4g "
        "duration_s=%.1f",
        adapter_name,
        baseline,
        decision,
        pooled.delta_points,
        pooled.p_value,
        durations["total"],
    )
    return result


def _back_to_candidate(
    session_factory: sessionmaker[Session], name: str, actor: str, exc: BaseException
) -> None:
    """Undo ``evaluating`` after a failure, so the candidate can be evaluated again."""
    try:
        with session_factory() as session:
            adapter = _load(session, name)
            if adapter.state == "evaluating":
                registry.transition(
                    session=session,
                    adapter=adapter,
                    to_state="candidate",
                    actor=actor,
                    reason=f"evaluation failed: {type(exc).__name__}: {exc}",
                )
    except Exception:
        # The original error is what the caller needs; this one only goes to the log.
        log.exception("event=gate_revert_failed adapter=%s", name)
