"""The ``kaizen`` command: serve, prepare the model, manage tokens and the database."""

from __future__ import annotations

import logging
import sys

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
app.add_typer(model_app, name="model")
app.add_typer(tokens_app, name="tokens")
app.add_typer(db_app, name="db")


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
    name: str = typer.Option(..., help="Who or what uses it."),
) -> None:
    """Create a token and print its secret (shown only this once)."""
    from server.store.db import make_engine, make_session_factory
    from server.store.tokens import Role, create_token

    try:
        parsed = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r}; use one of: {', '.join(r.value for r in Role)}")
    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        _, secret = create_token(session=session, name=name, role=parsed)
    engine.dispose()
    typer.echo(secret)


@tokens_app.command("list")
def tokens_list(all_: bool = typer.Option(False, "--all", help="Include revoked tokens.")) -> None:
    """List tokens (never their secrets)."""
    from server.store.db import make_engine, make_session_factory
    from server.store.tokens import list_tokens

    engine = make_engine(get_settings().database_url)
    with make_session_factory(engine)() as session:
        rows = list_tokens(session=session, include_revoked=all_)
    engine.dispose()
    typer.echo(f"{'id':>4}  {'role':<4}  {'prefix':<10}  {'created':<20}  {'revoked':<20}  name")
    for t in rows:
        revoked = t.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if t.revoked_at else "-"
        typer.echo(
            f"{t.id:>4}  {t.role:<4}  {t.prefix:<10}  "
            f"{t.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20}  {revoked:<20}  {t.name}"
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


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply database migrations."""
    from server.store.db import upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}")


if __name__ == "__main__":
    app()
