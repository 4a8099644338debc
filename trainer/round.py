"""One training round, start to finish: recorded outcomes -> execution-verified pairs -> CDAS
selection -> DPO+NLL on a LoRA adapter -> a ``candidate`` in the registry -> the gate, and an
approved candidate becomes the canary.

The round is the list :data:`trainer.stages.STAGES`, run in order by one helper,
:func:`trainer.pipeline.run_stage`:

    pairs      build_pairs: re-run texts, resample one-sided contexts, keep pass/fail pairs
    selection  CDAS (trainer.selection) and the min_pairs check
    train      DPO+NLL on a LoRA adapter (trainer.train)
    register   publish the adapter to the store, register it as a candidate
    gate       the gate, then the canary (trainer.handoff), when the round is given one

A round continues from the active adapter (or the one it is given): that adapter resamples
contexts that lack a side, scores the pairs for selection, is the trainable starting point and
the DPO reference, so round k learns from round k-1's own samples (CodeLutra's iteration).

Each stage writes its result into the round's work directory (``pairs.json``,
``selection.json``, ``trained.json``, ``registered.json``, ``gate.json``), so a killed round
resumes where it stopped: :func:`run_round` with ``resume_round_id`` loads what finished
stages left, and training killed half-way continues from the trainer's last checkpoint. After
every stage the funnel so far (and the durations, TRL's metrics, alarms, why it stopped) is
stored on the round's ``training_rounds`` row.

A round whose loss or gradients go non-finite stops at once: nothing is registered, the active
adapter stays, and the row says why (status ``stopped``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.store import registry
from server.store import rounds as round_store
from server.store.artifacts import restore_round_parents
from server.store.db import make_engine, make_session_factory
from server.store.governance import excluded_repositories
from server.store.models import Adapter, ApiToken, Completion
from trainer.config import TrainConfig
from trainer.generate import GeneratorFactory
from trainer.judging import judge_settings
from trainer.pipeline import GateStep, Round, RoundOptions, RoundReport, run_stage, timed
from trainer.records import load_outcome_records
from trainer.stages import STAGES

__all__ = ["RoundOptions", "RoundReport", "round_runner", "run_round"]

log = logging.getLogger(__name__)


def run_round(
    *,
    session_factory: sessionmaker[Session],
    base_model_dir: Path,
    rounds_dir: Path,
    config: TrainConfig,
    options: RoundOptions | None = None,
    generator_factory: GeneratorFactory | None = None,
    gate: GateStep | None = None,
    parent: str | None = None,
    trigger: str = "manual",
    dry_run: bool = False,
    resume_round_id: int | None = None,
    progress: bool = True,
    train_processes: int = 1,
) -> RoundReport:
    """Run (or, with ``resume_round_id``, finish) one round: the stages of
    :data:`trainer.stages.STAGES`, in order, each through :func:`trainer.pipeline.run_stage`;
    see the module docstring.

    ``parent`` names the adapter to continue from (default: the active one; none: the base).
    ``generator_factory`` builds the engine that resamples (None: no resampling). ``gate`` is
    the last stage (None: the candidate stays a candidate). ``train_processes`` above 1 trains
    under ``accelerate launch`` on that many processes (:mod:`trainer.launch`). A dry run
    builds pairs and selects them, reports the funnel, and trains and stores nothing.

    Example::

        report = run_round(
            session_factory=factory,
            base_model_dir=Path("~/.kaizen/models/qwen2.5-coder-0.5b-instruct").expanduser(),
            rounds_dir=Path("~/.kaizen/rounds").expanduser(),
            config=TrainConfig(),
            generator_factory=lambda: VllmGenerator(model_dir),
        )
        print(report.status, report.funnel, report.adapter_name)
    """
    r = _open_round(
        session_factory=session_factory,
        base_model_dir=Path(base_model_dir),
        rounds_dir=rounds_dir,
        config=config,
        options=options or RoundOptions(),
        generator_factory=generator_factory,
        gate=gate,
        parent=parent,
        trigger=trigger,
        dry_run=dry_run,
        resume_round_id=resume_round_id,
        progress=progress,
        train_processes=train_processes,
    )
    report = r.report
    try:
        for stage in STAGES:
            if not stage.when(r):
                continue
            end = run_stage(r, stage)
            if end is not None:
                report.status = end
                r.save(status=end, error=report.error)
                return report
        report.status = "succeeded"
        r.save(status="succeeded")
        log.info(
            "event=round_succeeded id=%s adapter=%s steps=%s gate=%s",
            report.round_id,
            report.adapter_name,
            report.metrics.get("steps"),
            (report.gate or {}).get("decision", "-"),
        )
        return report
    except Exception as exc:
        report.status = "failed"
        report.error = f"{type(exc).__name__}: {exc}"
        log.exception("event=round_failed id=%s", report.round_id)
        r.save(status="failed", error=report.error)
        raise


def _open_round(
    *,
    session_factory: sessionmaker[Session],
    base_model_dir: Path,
    rounds_dir: Path,
    config: TrainConfig,
    options: RoundOptions,
    generator_factory: GeneratorFactory | None,
    gate: GateStep | None,
    parent: str | None,
    trigger: str,
    dry_run: bool,
    resume_round_id: int | None,
    progress: bool,
    train_processes: int,
) -> Round:
    """Start the round's row (or take up the unfinished one) and load its records."""
    durations: dict[str, float] = {}
    with session_factory() as session:
        if resume_round_id is not None:
            row = round_store.get_round(session=session, round_id=resume_round_id)
            if row is None or row.status != "running":
                raise ValueError(f"round {resume_round_id} is not an unfinished round")
            parent_row = (
                session.get(Adapter, row.parent_adapter_id) if row.parent_adapter_id else None
            )
            until, round_id, work_dir = row.records_until, row.id, Path(row.work_dir)
            durations.update(row.durations or {})
            log.info("event=round_resume id=%d dir=%s", round_id, work_dir)
        else:
            parent_row = _parent(session, parent)
            until = datetime.now(UTC)
            round_id = None
            work_dir = Path(tempfile.mkdtemp(prefix="kaizen-dry-run-")) if dry_run else Path()
        parent_name = parent_row.name if parent_row is not None else None
        if round_id is None and not dry_run:
            rounds_dir.mkdir(parents=True, exist_ok=True)
            row = round_store.start_round(
                session=session,
                trigger=trigger,
                records_until=until,
                parent_adapter_id=parent_row.id if parent_row is not None else None,
                work_dir="",
                config={"train": asdict(config), "round": asdict(options)},
            )
            round_id = row.id
            work_dir = rounds_dir / f"round-{round_id:05d}"
            round_store.update_round(session=session, round_id=round_id, work_dir=str(work_dir))
            log.info("event=round_start id=%d trigger=%s parent=%s", round_id, trigger, parent_name)
        work_dir.mkdir(parents=True, exist_ok=True)
        with timed(durations, "load_records"):
            records = load_outcome_records(session=session, until=until)
            completions = _count_completions(session, until)
            # Read when the round starts: `kaizen repos exclude` holds from the next round on.
            excluded = excluded_repositories(session=session)
            reporters = _token_names(session, {r.token_id for r in records if r.token_id})
    funnel: dict[str, Any] = {
        "completions": completions,
        "outcome_records": len(records),
        "records_with_verdict": sum(1 for r in records if r.passed or r.failed),
        "excluded_repositories": sorted(excluded),
        # Who the token ids of the pairs' `token_shares` are (`kaizen tokens list`).
        "reporting_tokens": reporters,
    }
    report = RoundReport(
        round_id=round_id,
        status="running",
        funnel=funnel,
        durations=durations,
        parent_adapter=parent_name,
    )
    return Round(
        session_factory=session_factory,
        base_model_dir=base_model_dir,
        work_dir=work_dir,
        config=config,
        options=options,
        generator_factory=generator_factory,
        gate=gate,
        dry_run=dry_run,
        progress=progress,
        train_processes=train_processes,
        parent_id=parent_row.id if parent_row is not None else None,
        parent_dir=Path(parent_row.path) if parent_row is not None else None,
        records=records,
        excluded=excluded,
        report=report,
    )


# -- a round as the settings describe it ---------------------------------------------------------


def round_runner(
    settings: Settings,
    *,
    config: TrainConfig | None = None,
    options: RoundOptions | None = None,
    parent: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> Callable[[str, int | None], RoundReport]:
    """A round as the settings describe it: the served model, its engine limits for
    resampling and the gate, ``rounds_dir`` for the work, the gate-then-canary stage when
    ``KAIZEN_TRAIN_AUTO_GATE`` is on. What ``kaizen train`` and the worker run, as
    ``run(trigger, resume_round_id)``."""
    from server.engine.model import resolve_model_dir
    from trainer.generate import vllm_generator_factory
    from trainer.handoff import gate_and_canary

    assert settings.rounds_dir is not None
    rounds_dir = settings.rounds_dir
    base_model_dir = resolve_model_dir(settings)
    # One token budget for everything: what the server can serve (KAIZEN_MAX_MODEL_LEN) is
    # what selection scores and training trains (see trainer.budget).
    config = config or TrainConfig(
        max_steps=settings.train_max_steps, max_length=settings.max_model_len
    )
    options = options or RoundOptions(
        n_resample=settings.train_resample,
        max_token_share=settings.train_max_token_share,
        max_fix_distance=settings.train_max_fix_distance,
        **judge_settings(settings),  # KAIZEN_JUDGE_*: judge pairs where nothing executed
    )
    generator = vllm_generator_factory(settings, base_model_dir)

    def gate(session_factory: sessionmaker[Session], adapter_name: str) -> dict[str, Any]:
        return gate_and_canary(
            settings, session_factory, adapter_name, generator, progress=progress
        )

    def run(trigger: str, resume_round_id: int | None) -> RoundReport:
        db = make_engine(settings.database_url)
        try:
            with make_session_factory(db)() as session:  # trained on another trainer host?
                restore_round_parents(
                    session,
                    root=rounds_dir,
                    parent=parent,
                    endpoint_url=settings.adapter_store_endpoint_url or None,
                )
            return run_round(
                session_factory=make_session_factory(db),
                base_model_dir=base_model_dir,
                rounds_dir=rounds_dir,
                config=config,
                options=options,
                generator_factory=generator,
                gate=gate if settings.train_auto_gate else None,
                parent=parent,
                trigger=trigger,
                dry_run=dry_run,
                resume_round_id=resume_round_id,
                progress=progress,
                train_processes=settings.train_num_processes,
            )
        finally:
            db.dispose()

    return run


def _count_completions(session: Session, until: datetime) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Completion).where(Completion.created_at <= until)
        )
        or 0
    )


def _token_names(session: Session, ids: set[int]) -> dict[str, str]:
    if not ids:
        return {}
    rows = session.execute(select(ApiToken.id, ApiToken.name).where(ApiToken.id.in_(ids)))
    return {str(token_id): name for token_id, name in sorted(rows.tuples())}


def _parent(session: Session, name: str | None) -> Adapter | None:
    if name is None:
        return registry.active_adapter(session=session)
    adapter = registry.get_adapter(session=session, name=name)
    if adapter is None:
        raise LookupError(f"no adapter named {name!r} in the registry (see `kaizen adapters`)")
    return adapter
