"""The server's ``kaizen`` subcommands: serve, prepare the model, manage tokens, the adapter
registry, the rollout switches, excluded repositories and the database schema.

:func:`register` adds them to the ``kaizen`` command (:mod:`kaizen.cli`). Each command opens
its own short database session (:func:`server.store.db.session_scope`); the heavy imports
(uvicorn and vLLM behind ``server.app``, the model converter) stay inside the commands that
need them, so that ``kaizen tokens list`` starts in a fraction of a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from server.config import get_settings
from server.console import fail, setup_logging, warn_unknown_settings
from server.engine.lora import AdapterRejectedError, base_fingerprint, check_adapter
from server.store import registry
from server.store.db import DatabaseNotMigratedError, check_migrated, make_engine, session_scope
from server.store.db import upgrade as upgrade_database
from server.store.feedback import adapter_stats
from server.store.governance import exclude_repository, include_repository, list_excluded
from server.store.rollout import (
    RolloutError,
    get_rollout_state,
    pin,
    pinned_adapter,
    promote,
    rollback,
    set_rollout_state,
)
from server.store.tokens import (
    Role,
    TokenScopeError,
    create_token,
    describe_scope,
    list_tokens,
    revoke_token,
)

model_app = typer.Typer(help="The model Kaizen serves.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (roles: ide, ci, ops, metrics).", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
adapters_app = typer.Typer(
    help="The adapter registry: list, promote, roll back, pin. Running servers follow "
    "within KAIZEN_ROLLOUT_POLL_SECONDS.",
    no_args_is_help=True,
)
rollout_app = typer.Typer(
    help="Canary share, automatic rollout, training pause.", no_args_is_help=True
)
repos_app = typer.Typer(
    help="Repositories whose records never become training data.", no_args_is_help=True
)

_CLI_ACTOR = "cli"


def register(app: typer.Typer) -> None:
    """Add the server's subcommands to the ``kaizen`` command."""
    app.command()(serve)
    app.add_typer(model_app, name="model")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(db_app, name="db")
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(repos_app, name="repos")


def serve(
    host: str = typer.Option(None, help="Default: KAIZEN_HOST (127.0.0.1)."),
    port: int = typer.Option(None, help="Default: KAIZEN_PORT (8000)."),
) -> None:
    """Start the API server (the database must be migrated: `kaizen db upgrade`)."""
    import uvicorn

    from server.app import create_app

    settings = get_settings()
    setup_logging(settings.log_level)
    warn_unknown_settings()
    db = make_engine(settings.database_url)
    try:
        check_migrated(db)
    except DatabaseNotMigratedError as exc:
        fail(str(exc))
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
    setup_logging(settings.log_level)
    if settings.model != "bundled":
        typer.echo(f"KAIZEN_MODEL is {settings.model}; nothing to prepare.")
        return
    assert settings.model_cache is not None
    try:
        path = prepare_bundled_model(settings.model_cache)
    except ModelPrepareError as exc:
        fail(str(exc))
    typer.echo(str(path))


# -- tokens ----------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    role: str = typer.Option(..., help="ide, ci, ops or metrics (a Prometheus scraper)."),
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
    try:
        parsed = Role(role)
    except ValueError:
        fail(f"unknown role {role!r}; use one of: {', '.join(r.value for r in Role)}")
    repositories = list(repo or [])
    if parsed is Role.CI and not repositories and not all_repos:
        fail(
            "a ci token needs a scope: pass --repo github.com/acme/app (repeatable) for the "
            "repositories whose CI uses it, or --all-repos on a single-team install"
        )
    if repositories and all_repos:
        fail("pass either --repo or --all-repos, not both")
    if parsed is not Role.CI and (repositories or all_repos):
        fail(
            f"--repo and --all-repos are for ci tokens; a {parsed.value} token is not scoped to "
            "repositories (ide tokens reach their owner's completions, ops tokens everything)"
        )
    try:
        with session_scope(get_settings().database_url) as session:
            token, secret = create_token(
                session=session,
                name=name,
                role=parsed,
                repositories=repositories if parsed is Role.CI and not all_repos else None,
            )
            scope = describe_scope(token)
    except TokenScopeError as exc:
        fail(str(exc))
    typer.echo(secret)  # alone on stdout, so that scripts can capture it
    typer.echo(f"token {token.id} ({parsed.value}, {name}) may touch: {scope}", err=True)


@tokens_app.command("list")
def tokens_list(all_: bool = typer.Option(False, "--all", help="Include revoked tokens.")) -> None:
    """List tokens (never their secrets) with what each may touch."""
    with session_scope(get_settings().database_url) as session:
        rows = [(t, describe_scope(t)) for t in list_tokens(session=session, include_revoked=all_)]
    typer.echo(
        f"{'id':>4}  {'role':<7}  {'prefix':<10}  {'created':<20}  {'revoked':<20}  "
        f"{'name':<16}  scope"
    )
    for t, scope in rows:
        revoked = t.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if t.revoked_at else "-"
        typer.echo(
            f"{t.id:>4}  {t.role:<7}  {t.prefix:<10}  "
            f"{t.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20}  {revoked:<20}  "
            f"{t.name:<16}  {scope}"
        )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: int = typer.Argument(..., help="The id from `kaizen tokens list`."),
) -> None:
    """Revoke a token; running servers refuse it within KAIZEN_AUTH_CACHE_SECONDS."""
    with session_scope(get_settings().database_url) as session:
        token = revoke_token(session=session, token_id=token_id)
    if token is None:
        fail(f"no token with id {token_id}")
    typer.echo(f"revoked token {token_id} ({token.name})")


# -- the adapter registry and the rollout ------------------------------------------------------


@adapters_app.command("list")
def adapters_list() -> None:
    """Adapters with state, parent, gate result and online rates."""
    with session_scope(get_settings().database_url) as session:
        rows = registry.list_adapters(session=session)
        stats = {
            st.adapter: st
            for st in adapter_stats(
                session=session, since=datetime(1970, 1, 1, tzinfo=UTC), until=datetime.now(UTC)
            )
        }
        names = {a.id: a.name for a in rows}

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
    with session_scope(get_settings().database_url) as session:
        adapter = registry.get_adapter(session=session, name=name)
        if adapter is None:
            fail(f"no adapter named {name!r}")
        trail = registry.history(session=session, adapter_id=adapter.id)
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


def _checked_path(name: str) -> None:
    """Refuse, before the registry changes, an adapter no server could load."""
    from server.engine.model import resolve_model_dir

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        adapter = registry.get_adapter(session=session, name=name)
        path = adapter.path if adapter is not None else None
    if path is None:
        fail(f"no adapter named {name!r}; `kaizen adapters list` shows them")
    base = resolve_model_dir(settings)
    try:
        check_adapter(
            Path(path),
            max_rank=settings.max_lora_rank,
            base_sha256=base_fingerprint(base)["sha256"],
        )
    except AdapterRejectedError as exc:
        fail(f"adapter {name} refused: {exc}")


def _move(work: Callable[[Session], list[str]]) -> None:
    """Run one registry move (or rollout change) and print what changed."""
    try:
        with session_scope(get_settings().database_url) as session:
            changes = work(session)
    except (RolloutError, registry.TransitionError, LookupError, ValueError) as exc:
        fail(str(exc))
    for change in changes:
        typer.echo(change)


@adapters_app.command("promote")
def adapters_promote(
    name: str,
    to: str = typer.Option(..., help="canary or active."),
    reason: str = typer.Option("", help="Kept in the audit trail."),
) -> None:
    """Make an approved adapter the canary, or an approved/canary one active."""
    _checked_path(name)
    _move(lambda s: promote(session=s, name=name, to=to, actor=_CLI_ACTOR, reason=reason))


@adapters_app.command("rollback")
def adapters_rollback(reason: str = typer.Option("", help="Kept in the audit trail.")) -> None:
    """Retire the canary; without one, restore the previously active version."""
    _move(lambda s: rollback(session=s, actor=_CLI_ACTOR, reason=reason))


@adapters_app.command("pin")
def adapters_pin(
    name: str = typer.Argument(None, help="The version everybody gets; omit with --none."),
    none: bool = typer.Option(False, "--none", help="Unpin."),
) -> None:
    """Serve one version to everybody (no canary, no automatic moves), or unpin."""
    if (name is None) == (not none):
        fail("give an adapter name, or --none to unpin")
    if name is not None:
        _checked_path(name)
    _move(lambda s: pin(session=s, name=name, actor=_CLI_ACTOR))


@rollout_app.command("show")
def rollout_show() -> None:
    """The active and canary versions and the rollout switches."""
    with session_scope(get_settings().database_url) as session:
        state = get_rollout_state(session=session)
        active = registry.active_adapter(session=session)
        canary = registry.canary_adapter(session=session)
        pinned = pinned_adapter(session=session)
        typer.echo(f"active: {active.name if active else '(base model)'}")
        typer.echo(f"canary: {canary.name if canary else '-'} (share {state.canary_share})")
        typer.echo(f"pinned: {pinned.name if pinned else '-'}")
        typer.echo(f"automatic rollout: {'on' if state.auto_rollout else 'paused'}")
        typer.echo(f"training: {'paused' if state.training_paused else 'on'}")
        typer.echo(f"last change: {state.updated_at:%Y-%m-%d %H:%M:%S} by {state.updated_by}")


@rollout_app.command("set")
def rollout_set(
    canary_share: float = typer.Option(None, min=0.0, max=1.0, help="Share of tokens (0..1)."),
    auto: bool = typer.Option(None, "--auto/--no-auto", help="Automatic promote/rollback."),
    training: bool = typer.Option(None, "--training/--no-training", help="Scheduled rounds."),
) -> None:
    """Change the canary share, pause or resume automatic rollout and training."""
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
        fail("nothing to change; see --help")

    def work(session: Session) -> list[str]:
        set_rollout_state(session=session, actor=_CLI_ACTOR, **fields)
        return [f"{k} = {v}" for k, v in fields.items()]

    _move(work)


# -- repositories excluded from training -------------------------------------------------------


@repos_app.command("exclude")
def repos_exclude(
    repository: str = typer.Argument(..., help="host/owner/name or the clone URL."),
    reason: str = typer.Option("", help="Why (kept with the exclusion)."),
) -> None:
    """Exclude a repository from training; the next round leaves its records out."""
    try:
        with session_scope(get_settings().database_url) as session:
            row = exclude_repository(
                session=session, repository=repository, actor=_CLI_ACTOR, reason=reason
            )
            name = row.repository
    except ValueError as exc:
        fail(f"{exc}; give the repository as host/owner/name (github.com/acme/app)")
    typer.echo(f"excluded {name} from training (from the next round on)")


@repos_app.command("include")
def repos_include(
    repository: str = typer.Argument(..., help="host/owner/name or clone URL."),
) -> None:
    """Let an excluded repository's records train again."""
    try:
        with session_scope(get_settings().database_url) as session:
            found = include_repository(session=session, repository=repository)
    except ValueError as exc:
        fail(f"{exc}; give the repository as host/owner/name (github.com/acme/app)")
    if not found:
        fail(f"{repository} is not excluded (see `kaizen repos list`)")
    typer.echo(f"{repository} trains again (from the next round on)")


@repos_app.command("list")
def repos_list() -> None:
    """Repositories excluded from training."""
    with session_scope(get_settings().database_url) as session:
        rows = [
            (r.repository, r.excluded_at, r.excluded_by, r.reason)
            for r in list_excluded(session=session)
        ]
    if not rows:
        typer.echo("no repository is excluded from training")
        return
    for name, at, by, why in rows:
        typer.echo(f"{name}  excluded {at:%Y-%m-%d %H:%M} by {by}" + (f": {why}" if why else ""))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply database migrations."""
    upgrade_database(get_settings().database_url, revision)
    typer.echo(f"database at revision {revision}")
