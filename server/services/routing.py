"""Routing in a replica: which adapter version serves a request that names the base model.

To the pinned version if ops pinned one; else to the canary for a sticky share of tokens (a
token's hash decides, so one developer sees one version); else to the active version; else the
base model (None). A request names one adapter from its first token to its last: the route is
taken once, and the version is held (:meth:`Router.acquire`) until the request ends, so engine
sync never unloads a version a stream still uses.

The router only holds what :mod:`server.services.adapter_sync` last made servable; it reads no
database and loads nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from server.store.tokens import Principal


@dataclass(frozen=True)
class Routing:
    """What a replica routes to now (names of adapters the engine has loaded)."""

    active: str | None = None
    canary: str | None = None
    pinned: str | None = None
    canary_share: float = 0.0

    def names(self) -> set[str]:
        return {n for n in (self.active, self.canary, self.pinned) if n is not None}


def in_canary(token_id: int | None, share: float) -> bool:
    """Sticky: the same token always lands on the same side for a given share."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"kaizen-canary:{token_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class Router:
    """The routing table of one replica and the versions requests are using right now."""

    routing: Routing = field(default_factory=Routing)
    synced: bool = False  # the registry was read and loaded at least once
    in_flight: Counter[str] = field(default_factory=Counter)

    def route(self, principal: Principal) -> str | None:
        r = self.routing
        if r.pinned is not None:
            return r.pinned
        if r.canary is not None and in_canary(principal.token_id, r.canary_share):
            return r.canary
        return r.active

    def acquire(self, adapter: str | None) -> None:
        if adapter is not None:
            self.in_flight[adapter] += 1

    def release(self, adapter: str | None) -> None:
        if adapter is not None:
            self.in_flight[adapter] -= 1
            if self.in_flight[adapter] <= 0:
                del self.in_flight[adapter]

    def describe(self) -> dict[str, Any]:
        r = self.routing
        return {
            "active": r.active,
            "canary": r.canary,
            "pinned": r.pinned,
            "canary_share": r.canary_share,
            "in_flight": dict(self.in_flight),
        }
