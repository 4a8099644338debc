"""Bearer-token authentication with a short cache, so the hot path rarely touches the database,
and a bounded memory of good tokens, so a database outage does not lock every user out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from sqlalchemy.orm import Session, sessionmaker

from server.store.journal import DatabaseUnavailableError, is_database_unavailable
from server.store.tokens import Principal, find_principal, hash_secret

log = logging.getLogger(__name__)

NEGATIVE_CACHE_SIZE = 10_000
LOOKUP_TIMEOUT_S = 5.0  # a database that hangs (rather than refuses) must not hang requests
OUTAGE_RECHECK_S = 1.0  # during an outage, at most one lookup per second tries the database


class TokenAuthenticator:
    """Resolves a secret to a :class:`Principal`.

    * Results (also misses) are cached for ``ttl`` seconds, which bounds how long a revoked token
      keeps working on a running replica while the database is up.
    * While the database is unreachable, a token this replica verified within ``outage_grace``
      seconds keeps working (the last answer the database gave, so a token seen revoked stays
      refused); any other token gets :class:`DatabaseUnavailableError` (a 503 with Retry-After),
      never a 401 that would make an IDE drop a valid token. At most ``outage_cache_size``
      good tokens are remembered (least recently used first out); unknown tokens are cached
      apart, so a flood of random ones cannot push the good ones out.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        ttl: float = 10.0,
        *,
        outage_grace: float = 900.0,
        outage_cache_size: int = 10_000,
    ) -> None:
        self._session_factory = session_factory
        self._ttl = ttl
        self._grace = outage_grace
        self._good_size = outage_cache_size
        # key -> (verified at, principal): the database's last "yes" for each token.
        self._good: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        # key -> verified at: tokens the database said no to (unknown or revoked).
        self._bad: OrderedDict[str, float] = OrderedDict()
        self._down_until = 0.0  # skip the database until then: it just failed

    def _lookup(self, secret: str) -> Principal | None:
        with self._session_factory() as session:
            return find_principal(session=session, secret=secret)

    async def authenticate(self, secret: str) -> Principal | None:
        key = hash_secret(secret)
        now = time.monotonic()
        good, bad = self._good.get(key), self._bad.get(key)
        if good is not None and now - good[0] < self._ttl:
            return good[1]
        if bad is not None and now - bad < self._ttl:
            return None
        if now < self._down_until:
            return self._during_outage(key, now, good, bad, None)
        try:
            principal = await asyncio.wait_for(
                asyncio.to_thread(self._lookup, secret), LOOKUP_TIMEOUT_S
            )
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) or is_database_unavailable(exc)):
                raise
            self._down_until = time.monotonic() + OUTAGE_RECHECK_S
            return self._during_outage(key, now, good, bad, exc)
        self._down_until = 0.0
        self._remember(key, now, principal)
        return principal

    def _during_outage(
        self,
        key: str,
        now: float,
        good: tuple[float, Principal] | None,
        bad: float | None,
        exc: Exception | None,
    ) -> Principal | None:
        # The newer of the two answers wins: a token revoked after it was last seen good stays
        # refused.
        if bad is not None and (good is None or bad >= good[0]):
            return None
        if good is not None and now - good[0] < self._grace:
            self._good.move_to_end(key)
            log.debug("event=auth_outage_grace token_id=%d", good[1].token_id)
            return good[1]
        log.warning("event=auth_database_unavailable error=%r", _first_line(exc))
        raise DatabaseUnavailableError(
            "The token database is unavailable and this token was not verified recently; "
            "retry in a few seconds."
        ) from exc

    def _remember(self, key: str, now: float, principal: Principal | None) -> None:
        if principal is None:
            self._good.pop(key, None)
            self._bad[key] = now
            self._bad.move_to_end(key)
            while len(self._bad) > NEGATIVE_CACHE_SIZE:
                self._bad.popitem(last=False)
            return
        self._bad.pop(key, None)
        self._good[key] = (now, principal)
        self._good.move_to_end(key)
        while len(self._good) > self._good_size:
            self._good.popitem(last=False)


def _first_line(exc: Exception | None) -> str:
    if exc is None:
        return "unavailable moments ago"
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
