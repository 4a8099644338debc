"""The trainer's ``kaizen`` subcommands: ``train`` (a round now, or the background worker with
``--watch``), ``gate`` (evaluate a candidate) and ``rounds`` (the history).

:func:`register` adds them to the ``kaizen`` command (:mod:`kaizen.cli`).
"""

from __future__ import annotations

import typer

from server.config import get_settings
from server.console import echo_tree, fail, setup_logging, warn_unknown_settings
from server.store.db import make_engine, make_session_factory, session_scope
from server.store.rounds import list_rounds
from trainer.config import TrainConfig
from trainer.lock import RoundBusyError, round_lock
from trainer.round import RoundOptions, round_runner
from trainer.worker import RoundWorker, Schedule


def register(app: typer.Typer) -> None:
    """Add the trainer's subcommands to the ``kaizen`` command."""
    app.command()(train)
    app.command("gate")(gate_command)
    app.command()(rounds)


def train(
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Build and select pairs, print the funnel, train and store nothing.",
    ),
    watch: bool = typer.Option(
        False,
        "--watch",
        help="Run the background worker: a round "
        "whenever one is due (KAIZEN_TRAIN_MIN_NEW_RECORDS, "
        "KAIZEN_TRAIN_INTERVAL_HOURS).",
    ),
    parent: str = typer.Option(None, help="Adapter to continue from (default: the active one)."),
    max_steps: int = typer.Option(
        None, help="Cap on optimiser steps (default: KAIZEN_TRAIN_MAX_STEPS)."
    ),
    resample: int = typer.Option(
        None,
        help="Samples per tested context lacking a side "
        "(default: KAIZEN_TRAIN_RESAMPLE; 0 turns resampling off).",
    ),
    select: bool = typer.Option(None, "--select/--no-select", help="CDAS selection (default: on)."),
    gate: bool = typer.Option(
        None,
        "--gate/--no-gate",
        help="Gate the candidate afterwards and, if approved, make "
        "it the canary (default: KAIZEN_TRAIN_AUTO_GATE).",
    ),
    method: str = typer.Option(
        "dpo",
        "--method",
        help="dpo: DPO+NLL on the round's execution-verified pairs. grpo: outcome-gated GRPO "
        "on self-contained tasks the sandbox runs (MBPP+ train), the judge's score counted "
        "only for passing completions.",
    ),
    ungated: bool = typer.Option(
        False,
        "--ungated",
        help="GRPO only: pay the judge's score whether or not the tests pass. Exists only to "
        "show the difference (the process reward then gets hacked).",
    ),
    judge_model: str = typer.Option(
        None, "--judge-model", help="GRPO only: the judge's model directory (default: the base)."
    ),
) -> None:
    """Run a training round now: records -> pairs -> selection -> DPO+NLL -> a candidate
    (``--method grpo``: self-contained tasks -> outcome-gated GRPO -> a candidate)."""
    try:
        method_fields = method_options(
            method,
            ungated=ungated,
            judge_model=judge_model,
            watch=watch,
            resample=resample,
            select=select,
        )
    except ValueError as exc:
        fail(str(exc))
    settings = get_settings()
    if gate is not None:
        settings = settings.model_copy(update={"train_auto_gate": gate})
    setup_logging(settings.log_level)
    warn_unknown_settings()
    assert settings.rounds_dir is not None
    config = TrainConfig(
        max_steps=max_steps if max_steps is not None else settings.train_max_steps,
        max_length=settings.max_model_len,  # one budget: the serving context
        **method_fields,
    )
    options = RoundOptions(
        n_resample=resample if resample is not None else settings.train_resample,
        select=select is not False,
        max_token_share=settings.train_max_token_share,
        max_fix_distance=settings.train_max_fix_distance,
    )
    run = round_runner(settings, config=config, options=options, parent=parent, dry_run=dry_run)
    if watch:
        db = make_engine(settings.database_url)
        worker = RoundWorker(
            session_factory=make_session_factory(db),
            rounds_dir=settings.rounds_dir,
            schedule=Schedule(settings.train_min_new_records, settings.train_interval_hours),
            run=run,
            poll_seconds=settings.train_poll_seconds,
            retention_days=settings.retention_days,
        )
        try:
            worker.run_forever()
        except KeyboardInterrupt:
            typer.echo("trainer worker stopped")
        finally:
            db.dispose()
        return
    try:
        if dry_run:
            report = run("manual", None)
        else:
            with round_lock(settings.rounds_dir, database=settings.database_url):
                report = run("manual", None)
    except RoundBusyError as exc:
        fail(f"{exc}; try again when it has finished")
    except LookupError as exc:
        fail(str(exc))
    typer.echo(f"round {report.round_id or '(dry run)'}: {report.status}")
    if report.error:
        typer.echo(f"  reason: {report.error}")
    typer.echo(f"  parent adapter: {report.parent_adapter or '(base model)'}")
    typer.echo("funnel:")
    echo_tree(report.funnel)
    if report.metrics:
        typer.echo("metrics:")
        echo_tree(
            {k: round(v, 4) if isinstance(v, float) else v for k, v in report.metrics.items()}
        )
    if report.durations:
        typer.echo("durations (s): " + ", ".join(f"{k} {v}" for k, v in report.durations.items()))
    for alarm in report.alarms:
        typer.secho(f"alarm: {alarm}", fg=typer.colors.YELLOW, err=True)
    if report.adapter_name:
        typer.echo(f"candidate adapter: {report.adapter_name} at {report.adapter_dir}")
    if report.gate:
        typer.echo(f"gate: {report.gate['decision']}: " + "; ".join(report.gate["reasons"]))
        for change in report.gate["changes"]:
            typer.echo(f"  {change}")
    if report.status in ("stopped", "failed"):
        raise typer.Exit(1)


def method_options(
    method: str,
    *,
    ungated: bool = False,
    judge_model: str | None = None,
    watch: bool = False,
    resample: int | None = None,
    select: bool | None = None,
) -> dict[str, object]:
    """The :class:`TrainConfig` fields ``kaizen train``'s method options set; a ValueError that
    says what to change for a combination that cannot work."""
    if method not in ("dpo", "grpo"):
        raise ValueError(f"--method must be 'dpo' or 'grpo', not {method!r}")
    if method == "dpo":
        given = [
            flag for flag, on in (("--ungated", ungated), ("--judge-model", judge_model)) if on
        ]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to --method grpo only")
        return {}
    if watch:
        raise ValueError(
            "--watch runs DPO rounds when new CI verdicts arrive; a GRPO round trains on "
            "self-contained tasks, so run it on demand (kaizen train --method grpo)"
        )
    given = [
        f for f, v in (("--resample", resample), ("--select/--no-select", select)) if v is not None
    ]
    if given:
        raise ValueError(
            f"{' and '.join(given)} shape the pairs of a DPO round; a GRPO round has none"
        )
    fields: dict[str, object] = {"method": "grpo", "grpo_gated": not ungated}
    if judge_model:
        fields["grpo_judge_model"] = judge_model
    return fields


def gate_command(
    name: str = typer.Argument(..., help="A candidate adapter (see `kaizen adapters list`)."),
    limit: int = typer.Option(None, help="Tasks per suite (default: KAIZEN_GATE_LIMIT; 0: all)."),
    samples: int = typer.Option(
        None, min=1, help="Completions per task and side (default: KAIZEN_GATE_SAMPLES)."
    ),
    canary: bool = typer.Option(False, "--canary", help="If approved, make it the canary."),
) -> None:
    """Evaluate a candidate against the active adapter and approve or reject it."""
    from server.engine.model import resolve_model_dir
    from trainer.generate import vllm_generator_factory
    from trainer.handoff import gate_and_canary

    settings = get_settings()
    if limit is not None:
        settings = settings.model_copy(update={"gate_limit": limit})
    if samples is not None:
        settings = settings.model_copy(update={"gate_samples": samples})
    setup_logging(settings.log_level)
    model_dir = resolve_model_dir(settings)
    db = make_engine(settings.database_url)
    try:
        out = gate_and_canary(
            settings,
            make_session_factory(db),
            name,
            vllm_generator_factory(settings, model_dir),
            canary=canary,
        )
    except (ValueError, LookupError) as exc:
        fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"{name}: {out['decision']}")
    for reason in out["reasons"]:
        typer.echo(f"  {reason}")
    for change in out["changes"]:
        typer.echo(f"  {change}")


def rounds(limit: int = typer.Option(20, help="How many, newest first.")) -> None:
    """List training rounds."""
    with session_scope(get_settings().database_url) as session:
        rows = list_rounds(session=session, limit=limit)
    typer.echo(
        f"{'id':>4}  {'status':<9}  {'trigger':<8}  {'started':<19}  {'pairs':>5}  "
        f"{'trained':>7}  error"
    )
    for r in rows:
        pairs = (r.funnel.get("pairs") or {}).get("pairs", "-")
        typer.echo(
            f"{r.id:>4}  {r.status:<9}  {r.trigger:<8}  "
            f"{r.started_at.strftime('%Y-%m-%d %H:%M:%S'):<19}  {pairs!s:>5}  "
            f"{r.funnel.get('trained_pairs', '-')!s:>7}  {r.error or ''}"
        )
