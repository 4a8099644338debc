"""API tokens: create, look up, list and revoke. Secrets are never stored, only their SHA-256.

What a token may touch besides its role's endpoints:

- ``ci`` tokens are scoped to repositories (``ApiToken.repositories``) or, for a single-team
  install, to all of them (``ApiToken.all_repositories``).
- ``ide`` tokens act for their owner, the person named by the token's ``name``: they may post
  events and ledger entries only for completions that a token of the same name received (so a
  replacement token, or one per machine, keeps working on the same completions).
- ``ops`` tokens may touch everything.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.store.models import ApiToken, ApiTokenRepository, utcnow
from server.store.repositories import normalise_repository, normalised_or_none

TOKEN_PREFIX = "kz_"


class Role(StrEnum):
    IDE = "ide"
    CI = "ci"
    OPS = "ops"
    METRICS = "metrics"  # a Prometheus scraper: GET /metrics and nothing else


class TokenScopeError(ValueError):
    """A token's repository scope that cannot be created as asked."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role (never the secret), and for a scoped
    ``ci`` token the repositories it may report on (``None``: every repository)."""

    token_id: int
    name: str
    role: Role
    repositories: frozenset[str] | None = None

    def covers(self, repository: str | None) -> bool:
        """Whether this token may read or report on ``repository`` (any form; normalised
        here). A scoped token covers no completion served without a repository."""
        if self.repositories is None:
            return True
        normalised = normalised_or_none(repository)
        return normalised is not None and normalised in self.repositories

    def owns(self, *, token_id: int | None, owner: str | None) -> bool:
        """Whether a completion received by token ``token_id`` (named ``owner``) is this
        principal's to report on as an editor: the same token, or another of its owner's."""
        if self.role is Role.OPS:
            return True
        return token_id == self.token_id or (owner is not None and owner == self.name)


def hash_secret(secret: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(secret.encode()).hexdigest()


def _scope(role: Role, repositories: Iterable[str] | None) -> list[str] | None:
    """The normalised, de-duplicated repositories of a new token (``None``: all)."""
    if repositories is None:
        return None
    if role is not Role.CI:
        raise TokenScopeError(
            f"only ci tokens are scoped to repositories; a {role.value} token is not "
            "(ide tokens reach their own completions, ops tokens everything)"
        )
    scope: list[str] = []
    for value in repositories:
        try:
            normalised = normalise_repository(value)
        except ValueError as exc:
            raise TokenScopeError(
                f"bad repository {value!r} ({exc}); give it as host/owner/name "
                "(github.com/acme/app) or as the clone URL"
            ) from None
        if normalised not in scope:
            scope.append(normalised)
    if not scope:
        raise TokenScopeError(
            "a scoped ci token needs at least one repository (or every repository)"
        )
    return scope


def create_token(
    *,
    session: Session,
    name: str,
    role: Role,
    repositories: Iterable[str] | None = None,
) -> tuple[ApiToken, str]:
    """Store a new token and return it with its secret, which is shown only this once.

    ``repositories`` scopes a ``ci`` token to those repositories (normalised like the clients'
    ``origin``); ``None`` gives it every repository, which is what callers that predate scoping
    get. ``kaizen tokens create`` makes the operator choose between the two explicitly.
    Raises :class:`TokenScopeError` for a scope on a non-ci token or an empty scope.
    """
    scope = _scope(role, repositories)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        role=role.value,
        token_hash=hash_secret(secret),
        prefix=secret[: len(TOKEN_PREFIX) + 6],
        all_repositories=scope is None,
        repositories=[ApiTokenRepository(repository=r) for r in scope or ()],
    )
    session.add(token)
    session.commit()
    return token, secret


def principal_for(token: ApiToken) -> Principal:
    """The principal a token authenticates as (its scope loaded from the token's rows)."""
    role = Role(token.role)
    scoped = role is Role.CI and not token.all_repositories
    return Principal(
        token_id=token.id,
        name=token.name,
        role=role,
        repositories=frozenset(r.repository for r in token.repositories) if scoped else None,
    )


def find_principal(*, session: Session, secret: str) -> Principal | None:
    """The principal for an unrevoked token with this secret, else None."""
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))
    if token is None or token.revoked_at is not None:
        return None
    return principal_for(token)


def describe_scope(token: ApiToken) -> str:
    """What a token may touch beyond its role, for listings."""
    if token.role == Role.CI.value:
        if token.all_repositories:
            return "all repositories"
        return ", ".join(sorted(r.repository for r in token.repositories)) or "no repository"
    if token.role == Role.IDE.value:
        return f"completions of {token.name!r}"
    if token.role == Role.METRICS.value:
        return "GET /metrics only"
    return "everything"


def list_tokens(*, session: Session, include_revoked: bool = False) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_token(*, session: Session, token_id: int) -> ApiToken | None:
    """Revoke by id; returns the token, or None if there is no such token."""
    token = session.get(ApiToken, token_id)
    if token is None:
        return None
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.commit()
    return token
