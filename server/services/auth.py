"""Bearer-token authentication with a short cache, so the hot path rarely touches the database."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.orm import Session, sessionmaker

from server.store.tokens import Principal, find_principal, hash_secret


class TokenAuthenticator:
    """Resolves a secret to a :class:`Principal`; results (also misses) are cached for ``ttl``
    seconds, which bounds how long a revoked token keeps working on a running replica."""

    def __init__(self, session_factory: sessionmaker[Session], ttl: float = 10.0) -> None:
        self._session_factory = session_factory
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    def _lookup(self, secret: str) -> Principal | None:
        with self._session_factory() as session:
            return find_principal(session=session, secret=secret)

    async def authenticate(self, secret: str) -> Principal | None:
        key = hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        principal = await asyncio.to_thread(self._lookup, secret)
        if len(self._cache) > 10_000:  # bound memory against floods of random tokens
            self._cache.clear()
        self._cache[key] = (now, principal)
        return principal
