"""Dashboard sessions: a browser cannot send a bearer header when it navigates, so an operator
logs in once with an ops token and gets a cookie that stands in for it on the dashboard's paths.

The cookie is ``v1.<token id>.<expiry>.<signature>``: an HMAC-SHA256 of the id and expiry keyed
with the SHA-256 of the token's secret, which only the database holds. So any replica verifies
it (no shared session store, no extra secret to configure), the raw token is never in the
cookie, a revoked token's sessions end with it, and a session ends at its expiry
(``SESSION_HOURS``). Whoever can read the tokens table could forge a session; they can read
everything the dashboard shows already.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from server.services.auth import LOOKUP_TIMEOUT_S
from server.store.journal import DatabaseUnavailableError
from server.store.sessions import session_token
from server.store.tokens import Principal, hash_secret

COOKIE = "kaizen_dashboard"
SESSION_HOURS = 8.0
_CONTEXT = b"kaizen-dashboard-session\x00"


def _sign(token_hash: str, token_id: int, expires: int) -> str:
    message = _CONTEXT + f"{token_id}.{expires}".encode()
    return hmac.new(bytes.fromhex(token_hash), message, hashlib.sha256).hexdigest()


class DashboardSessions:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        hours: float = SESSION_HOURS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session_factory = session_factory
        self.max_age = int(hours * 3600)
        self._clock = clock

    def open(self, secret: str, principal: Principal) -> str:
        """The cookie value of a new session for the token ``secret`` (already authenticated
        as ``principal``)."""
        expires = int(self._clock()) + self.max_age
        signature = _sign(hash_secret(secret), principal.token_id, expires)
        return f"v1.{principal.token_id}.{expires}.{signature}"

    async def verify(self, value: str) -> Principal | None:
        """The principal of a valid, unexpired session of an unrevoked token, else None."""
        version, _, rest = value.partition(".")
        token_id, _, rest = rest.partition(".")
        expires, _, signature = rest.partition(".")
        if version != "v1" or not token_id.isdigit() or not expires.isdigit():
            return None
        if int(expires) <= self._clock():
            return None
        try:  # a database that hangs must not hang the page (a refusal is a 503 with Retry-After)
            found = await asyncio.wait_for(
                asyncio.to_thread(self._lookup, int(token_id)), LOOKUP_TIMEOUT_S
            )
        except TimeoutError as exc:
            raise DatabaseUnavailableError(
                "The token database did not answer; retry in a few seconds."
            ) from exc
        if found is None:
            return None
        principal, token_hash = found
        if not hmac.compare_digest(_sign(token_hash, int(token_id), int(expires)), signature):
            return None
        return principal

    def _lookup(self, token_id: int) -> tuple[Principal, str] | None:
        with self._session_factory() as session:
            return session_token(session=session, token_id=token_id)
