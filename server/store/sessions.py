"""What a dashboard session is checked against: the token it was opened with, by id (the
session cookie carries the id, never the secret)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from server.store.models import ApiToken
from server.store.tokens import Principal, principal_for


def session_token(*, session: Session, token_id: int) -> tuple[Principal, str] | None:
    """The principal of an unrevoked token and the SHA-256 of its secret, else None."""
    token = session.get(ApiToken, token_id)
    if token is None or token.revoked_at is not None:
        return None
    return principal_for(token), token.token_hash
