"""The ``kaizen`` command: serve, prepare the model, manage tokens and the database."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.config import get_settings

app = typer.Typer(
    help="Kaizen: an on-prem code assistant that learns from its users' tests.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="The model Kaizen serves.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (roles: ide, ci, ops).", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
adapters_app = typer.Typer(
    help="The adapter registry: list, promote, roll back, pin. Running servers follow "
    "within KAIZEN_ROLLOUT_POLL_SECONDS.",
    no_args_is_help=True,
)
rollout_app = typer.Typer(
    help="Canary share, automatic rollout, training pause.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
app.add_typer(tokens_app, name="tokens")
app.add_typer(db_app, name="db")
app.add_typer(adapters_app, name="adapters")
app.add_typer(rollout_app, name="rollout")
repos_app = typer.Typer(
    help="Repositories whose records never become training data.", no_args_is_help=True
)
app.add_typer(repos_app, name="repos")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def serve(
    host: str = typer.Option(None, help="Default: KAIZEN_HOST (127.0.0.1)."),
    port: int = typer.Option(None, help="Default: KAIZEN_PORT (8000)."),
) -> None:
    """Start the API server (the database must be migrated: `kaizen db upgrade`)."""
    import uvicorn

    from server.app import create_app
    from server.store.db import DatabaseNotMigratedError, check_migrated, make_engine

    settings = get_settings()
    _setup_logging(settings.log_level)
    db = make_engine(settings.database_url)
    try:
        check_migrated(db)
    except DatabaseNotMigratedError as exc:
        _fail(str(exc))
    finally:
        db.dispose()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


@model_app.command("prepare")
def model_prepare() -> None:
    """Download, verify and convert the bundled model (a no-op once done)."""
    from server.model_prep import ModelPrepareError, prepare_bundled_model

    settings = get_settings()
    _setup_logging(settings.log_level)
    if settings.model != "bundled":
        typer.echo(f"KAIZEN_MODEL is {settings.model}; nothing to prepare.")
        return
    assert settings.model_cache is not None
    try:
        path = prepare_bundled_model(settings.model_cache)
    except ModelPrepareError as exc:
        _fail(str(exc))
    typer.echo(str(path))


@tokens_app.command("create")
def tokens_create(
    role: str = typer.Option(..., help="ide, ci or ops."),
    name: str = typer.Option(
        ...,
        help="Who or what uses it. ide tokens with the same name are one owner: they share "
        "their completions' events and ledger entries (a replacement token, a second machine).",
    ),
    repo: Annotated[
        list[str] | None,
        typer.Option(
            "--repo",
            help="ci only, repeatable: a repository the token may read ledgers of and report on "
            "(github.com/acme/app, or a clone URL; normalised like the extension's origin).",
        ),
    ] = None,
    all_repos: bool = typer.Option(
        False,
        "--all-repos",
        help="ci only: every repository (a single-team install where one CI token is shared).",
    ),
) -> None:
    """Create a token and print its secret (shown only this once)."""
    from server.store.db import make_engine, make_session_factory
    from server.store.tokens import Role, TokenScopeError, create_token, describe_scope

    try:
        parsed = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r}; use one of: {', '.join(r.value for r in Role)}")
    repositories = list(repo or [])
    if parsed is Role.CI and not repositories and not all_repos:
        _fail(
            "a ci token needs a scope: pass --repo github.com/acme/app (repeatable) for the "
            "repositories whose CI uses it, or --all-repos on a single-team install"
        )
    if repositories and all_repos:
        _fail("pass either --repo or --all-repos, not both")
    if parsed is not Role.CI and (repositories or all_repos):
        _fail(
            f"--repo and --all-repos are for ci tokens; a {parsed.value} token is not scoped to "
            "repositories (ide tokens reach their owner's completions, ops tokens everything)"
        )
    engine = make_engine(get_settings().database_url)
    try:
        with make_session_factory(engine)() as session:
            token, secret = create_token(
                session=session,
                name=name,
                role=parsed,
                repositories=repositories if parsed is Role.CI and not all_repos else None,
            )
            scope = describe_scope(token)
    except TokenScopeError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo(secret)  # alone on stdout, so that scripts can capture it
    typer.echo(f"token {token.id} ({parsed.value}, {name}) may touch: {scope}", err=True)


@tokens_app.command("list")
def tokens_list(all_: bool = typer.Option(False, "--all", help="Include revoked tokens.")) -> None:
    """List tokens (never their secrets) with what each may touch."""
    from server.store.db import make_engine, make_session_factory
    from server.store.tokens import describe_scope, list_tokens

    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        rows = [(t, describe_scope(t)) for t in list_tokens(session=session, include_revoked=all_)]
    engine.dispose()
    typer.echo(
        f"{'id':>4}  {'role':<4}  {'prefix':<10}  {'created':<20}  {'revoked':<20}  "
        f"{'name':<16}  scope"
    )
    for t, scope in rows:
        revoked = t.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if t.revoked_at else "-"
        typer.echo(
            f"{t.id:>4}  {t.role:<4}  {t.prefix:<10}  "
            f"{t.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20}  {revoked:<20}  "
            f"{t.name:<16}  {scope}"
        )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: int = typer.Argument(..., help="The id from `kaizen tokens list`."),
) -> None:
    """Revoke a token; running servers refuse it within KAIZEN_AUTH_CACHE_SECONDS."""
    from server.store.db import make_engine, make_session_factory
    from server.store.tokens import revoke_token

    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        token = revoke_token(session=session, token_id=token_id)
    engine.dispose()
    if token is None:
        _fail(f"no token with id {token_id}")
    typer.echo(f"revoked token {token_id} ({token.name})")


def _print_funnel(funnel: dict, indent: str = "  ") -> None:  # type: ignore[type-arg]
    for key, value in funnel.items():
        if isinstance(value, dict):
            typer.echo(f"{indent}{key}:")
            _print_funnel(value, indent + "  ")
        else:
            typer.echo(f"{indent}{key}: {value}")


@app.command()
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
    select: bool = typer.Option(True, "--select/--no-select", help="CDAS selection."),
    gate: bool = typer.Option(
        None,
        "--gate/--no-gate",
        help="Gate the candidate afterwards and, if approved, make "
        "it the canary (default: KAIZEN_TRAIN_AUTO_GATE).",
    ),
) -> None:
    """Run a training round now: records -> pairs -> selection -> DPO+NLL -> a candidate."""
    from server.store.db import make_engine, make_session_factory
    from trainer.config import TrainConfig
    from trainer.round import RoundOptions
    from trainer.worker import RoundBusyError, RoundWorker, Schedule, round_lock, round_runner

    settings = get_settings()
    if gate is not None:
        settings = settings.model_copy(update={"train_auto_gate": gate})
    _setup_logging(settings.log_level)
    assert settings.rounds_dir is not None
    config = TrainConfig(
        max_steps=max_steps if max_steps is not None else settings.train_max_steps,
        max_length=settings.max_model_len,  # one budget: the serving context
    )
    options = RoundOptions(
        n_resample=resample if resample is not None else settings.train_resample,
        select=select,
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
            with round_lock(settings.rounds_dir):
                report = run("manual", None)
    except RoundBusyError as exc:
        _fail(f"{exc}; try again when it has finished")
    except LookupError as exc:
        _fail(str(exc))
    typer.echo(f"round {report.round_id or '(dry run)'}: {report.status}")
    if report.error:
        typer.echo(f"  reason: {report.error}")
    typer.echo(f"  parent adapter: {report.parent_adapter or '(base model)'}")
    typer.echo("funnel:")
    _print_funnel(report.funnel)
    if report.metrics:
        typer.echo("metrics:")
        _print_funnel(
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


@app.command("gate")
def gate_command(
    name: str = typer.Argument(..., help="A candidate adapter (see `kaizen adapters list`)."),
    limit: int = typer.Option(None, help="Tasks per suite (default: KAIZEN_GATE_LIMIT; 0: all)."),
    samples: int = typer.Option(
        None, min=1, help="Completions per task and side (default: KAIZEN_GATE_SAMPLES)."
    ),
    canary: bool = typer.Option(False, "--canary", help="If approved, make it the canary."),
) -> None:
    """Evaluate a candidate against the active adapter and approve or reject it."""
    from server.engine.vllm_engine import resolve_model_dir
    from server.store.db import make_engine, make_session_factory
    from trainer.worker import gate_and_canary, vllm_generator_factory

    settings = get_settings()
    if limit is not None:
        settings = settings.model_copy(update={"gate_limit": limit})
    if samples is not None:
        settings = settings.model_copy(update={"gate_samples": samples})
    _setup_logging(settings.log_level)
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
        _fail(str(exc))
    finally:
        db.dispose()
    typer.echo(f"{name}: {out['decision']}")
    for reason in out["reasons"]:
        typer.echo(f"  {reason}")
    for change in out["changes"]:
        typer.echo(f"  {change}")


@app.command()
def rounds(limit: int = typer.Option(20, help="How many, newest first.")) -> None:
    """List training rounds."""
    from server.store.db import make_engine, make_session_factory
    from server.store.rounds import list_rounds

    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        rows = list_rounds(session=session, limit=limit)
    engine.dispose()
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


def _session():  # type: ignore[no-untyped-def]
    from server.store.db import make_engine, make_session_factory

    engine = make_engine(get_settings().database_url)
    return make_session_factory(engine)(), engine


_CLI_ACTOR = "cli"


@adapters_app.command("list")
def adapters_list() -> None:
    """Adapters with state, parent, gate result and online rates."""
    from datetime import UTC, datetime

    from server.store.adapters import list_adapters
    from server.store.feedback import adapter_stats

    session, engine = _session()
    with session:
        rows = list_adapters(session=session)
        stats = {
            st.adapter: st
            for st in adapter_stats(
                session=session, since=datetime(1970, 1, 1, tzinfo=UTC), until=datetime.now(UTC)
            )
        }
        names = {a.id: a.name for a in rows}
    engine.dispose()

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    typer.echo(
        f"{'name':<28} {'state':<10} {'parent':<28} {'gate':<9} {'accept':>6} "
        f"{'ci_pass':>7} {'n':>5}"
    )
    for a in rows:
        st = stats.get(a.name)
        gate = (a.evaluation or {}).get("decision", "-")
        typer.echo(
            f"{a.name:<28} {a.state:<10} {names.get(a.parent_id, '-') if a.parent_id else '-':<28} "
            f"{gate:<9} {rate(st.acceptance_rate if st else None):>6} "
            f"{rate(st.ci_pass_rate if st else None):>7} {st.completions if st else 0:>5}"
        )


@adapters_app.command("show")
def adapters_show(name: str) -> None:
    """One adapter: manifest summary, evaluation, and its audit trail."""
    import json

    from server.store.adapters import get_adapter, history

    session, engine = _session()
    with session:
        adapter = get_adapter(session=session, name=name)
        if adapter is None:
            _fail(f"no adapter named {name!r}")
        trail = history(session=session, adapter_id=adapter.id)
        typer.echo(f"{adapter.name}: {adapter.state}, {adapter.path}")
        manifest = {
            k: v for k, v in adapter.manifest.items() if k not in ("record_ids", "pair_ids")
        }
        typer.echo(
            json.dumps(
                {"manifest": manifest, "evaluation": adapter.evaluation}, indent=2, default=str
            )
        )
        for t in trail:
            typer.echo(
                f"  {t.at:%Y-%m-%d %H:%M:%S}  {t.from_state or '-':>10} -> "
                f"{t.to_state:<10} {t.actor}: {t.reason}"
            )
    engine.dispose()


def _checked_path(name: str) -> None:
    """Refuse, before the registry changes, an adapter no server could load."""
    from server.engine.adapters import AdapterRejectedError, base_fingerprint, check_adapter
    from server.engine.vllm_engine import resolve_model_dir
    from server.store.adapters import get_adapter

    settings = get_settings()
    session, engine = _session()
    with session:
        adapter = get_adapter(session=session, name=name)
        path = adapter.path if adapter is not None else None
    engine.dispose()
    if path is None:
        _fail(f"no adapter named {name!r}; `kaizen adapters list` shows them")
    base = resolve_model_dir(settings)
    try:
        check_adapter(
            Path(path),
            max_rank=settings.max_lora_rank,
            base_sha256=base_fingerprint(base)["sha256"],
        )
    except AdapterRejectedError as exc:
        _fail(f"adapter {name} refused: {exc}")


def _rollout_call(work) -> None:  # type: ignore[no-untyped-def]
    from server.services.rollout import RolloutError
    from server.store.adapters import TransitionError

    session, engine = _session()
    try:
        with session:
            for change in work(session):
                typer.echo(change)
    except (RolloutError, TransitionError, LookupError, ValueError) as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


@adapters_app.command("promote")
def adapters_promote(
    name: str,
    to: str = typer.Option(..., help="canary or active."),
    reason: str = typer.Option("", help="Kept in the audit trail."),
) -> None:
    """Make an approved adapter the canary, or an approved/canary one active."""
    from server.services.rollout import promote

    _checked_path(name)
    _rollout_call(lambda s: promote(session=s, name=name, to=to, actor=_CLI_ACTOR, reason=reason))


@adapters_app.command("rollback")
def adapters_rollback(reason: str = typer.Option("", help="Kept in the audit trail.")) -> None:
    """Retire the canary; without one, restore the previously active version."""
    from server.services.rollout import rollback

    _rollout_call(lambda s: rollback(session=s, actor=_CLI_ACTOR, reason=reason))


@adapters_app.command("pin")
def adapters_pin(
    name: str = typer.Argument(None, help="The version everybody gets; omit with --none."),
    none: bool = typer.Option(False, "--none", help="Unpin."),
) -> None:
    """Serve one version to everybody (no canary, no automatic moves), or unpin."""
    from server.services.rollout import pin

    if (name is None) == (not none):
        _fail("give an adapter name, or --none to unpin")
    if name is not None:
        _checked_path(name)
    _rollout_call(lambda s: pin(session=s, name=name, actor=_CLI_ACTOR))


@rollout_app.command("show")
def rollout_show() -> None:
    """The active and canary versions and the rollout switches."""
    from server.store.adapters import active_adapter, canary_adapter
    from server.store.models import Adapter
    from server.store.rollout import get_rollout_state

    session, engine = _session()
    with session:
        state = get_rollout_state(session=session)
        active, canary = active_adapter(session=session), canary_adapter(session=session)
        pinned = session.get(Adapter, state.pinned_adapter_id) if state.pinned_adapter_id else None
        typer.echo(f"active: {active.name if active else '(base model)'}")
        typer.echo(f"canary: {canary.name if canary else '-'} (share {state.canary_share})")
        typer.echo(f"pinned: {pinned.name if pinned else '-'}")
        typer.echo(f"automatic rollout: {'on' if state.auto_rollout else 'paused'}")
        typer.echo(f"training: {'paused' if state.training_paused else 'on'}")
        typer.echo(f"last change: {state.updated_at:%Y-%m-%d %H:%M:%S} by {state.updated_by}")
    engine.dispose()


@rollout_app.command("set")
def rollout_set(
    canary_share: float = typer.Option(None, min=0.0, max=1.0, help="Share of tokens (0..1)."),
    auto: bool = typer.Option(None, "--auto/--no-auto", help="Automatic promote/rollback."),
    training: bool = typer.Option(None, "--training/--no-training", help="Scheduled rounds."),
) -> None:
    """Change the canary share, pause or resume automatic rollout and training."""
    from server.store.rollout import set_rollout_state

    fields = {
        k: v
        for k, v in {
            "canary_share": canary_share,
            "auto_rollout": auto,
            "training_paused": None if training is None else not training,
        }.items()
        if v is not None
    }
    if not fields:
        _fail("nothing to change; see --help")

    def work(session):  # type: ignore[no-untyped-def]
        set_rollout_state(session=session, actor=_CLI_ACTOR, **fields)
        return [f"{k} = {v}" for k, v in fields.items()]

    _rollout_call(work)


@repos_app.command("exclude")
def repos_exclude(
    repository: str = typer.Argument(..., help="host/owner/name or the clone URL."),
    reason: str = typer.Option("", help="Why (kept with the exclusion)."),
) -> None:
    """Exclude a repository from training; the next round leaves its records out."""
    from server.store.db import make_engine, make_session_factory
    from server.store.governance import exclude_repository

    engine = make_engine(get_settings().database_url)
    try:
        with make_session_factory(engine)() as session:
            row = exclude_repository(
                session=session, repository=repository, actor=_CLI_ACTOR, reason=reason
            )
            name = row.repository
    except ValueError as exc:
        _fail(f"{exc}; give the repository as host/owner/name (github.com/acme/app)")
    finally:
        engine.dispose()
    typer.echo(f"excluded {name} from training (from the next round on)")


@repos_app.command("include")
def repos_include(
    repository: str = typer.Argument(..., help="host/owner/name or clone URL."),
) -> None:
    """Let an excluded repository's records train again."""
    from server.store.db import make_engine, make_session_factory
    from server.store.governance import include_repository

    engine = make_engine(get_settings().database_url)
    try:
        with make_session_factory(engine)() as session:
            found = include_repository(session=session, repository=repository)
    except ValueError as exc:
        _fail(f"{exc}; give the repository as host/owner/name (github.com/acme/app)")
    finally:
        engine.dispose()
    if not found:
        _fail(f"{repository} is not excluded (see `kaizen repos list`)")
    typer.echo(f"{repository} trains again (from the next round on)")


@repos_app.command("list")
def repos_list() -> None:
    """Repositories excluded from training."""
    from server.store.db import make_engine, make_session_factory
    from server.store.governance import list_excluded

    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        rows = [
            (r.repository, r.excluded_at, r.excluded_by, r.reason)
            for r in list_excluded(session=session)
        ]
    engine.dispose()
    if not rows:
        typer.echo("no repository is excluded from training")
        return
    for name, at, by, why in rows:
        typer.echo(f"{name}  excluded {at:%Y-%m-%d %H:%M} by {by}" + (f": {why}" if why else ""))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply database migrations."""
    from server.store.db import upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}")


if __name__ == "__main__":
    app()
