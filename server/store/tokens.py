"""API tokens: create, look up, list and revoke. Secrets are never stored, only their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.store.models import ApiToken, utcnow

TOKEN_PREFIX = "kz_"


class Role(StrEnum):
    IDE = "ide"
    CI = "ci"
    OPS = "ops"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role (never the secret)."""

    token_id: int
    name: str
    role: Role


def hash_secret(secret: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(*, session: Session, name: str, role: Role) -> tuple[ApiToken, str]:
    """Store a new token and return it with its secret, which is shown only this once."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        role=role.value,
        token_hash=hash_secret(secret),
        prefix=secret[: len(TOKEN_PREFIX) + 6],
    )
    session.add(token)
    session.commit()
    return token, secret


def find_principal(*, session: Session, secret: str) -> Principal | None:
    """The principal for an unrevoked token with this secret, else None."""
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))
    if token is None or token.revoked_at is not None:
        return None
    return Principal(token_id=token.id, name=token.name, role=Role(token.role))


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
