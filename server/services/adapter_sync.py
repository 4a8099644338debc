"""Engine sync: keep the engine's loaded adapters and the replica's routing in step with the
registry.

Every replica polls the registry (``KAIZEN_ROLLOUT_POLL_SECONDS``) and loads what became
active, canary or pinned under the version's own never-reused name, runs one token through it
(warm-up), and only then routes to it. A version that cannot be loaded (corrupt, another base
model, rank over the limit) is refused, logged and left out of routing; serving goes on with
what was there. A version that left routing is unloaded once no request uses it and a grace
period has passed. Each poll also lets the canary judge decide
(:mod:`server.services.canary_judge`).

A version published to an object store (``KAIZEN_ADAPTER_STORE``) is first fetched into this
replica's cache (``KAIZEN_ADAPTER_CACHE_DIR``) and its checksum verified
(:mod:`server.store.artifacts`); a missing or corrupt object is refused like a corrupt
directory, a store that does not answer is tried again at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.engine.base import Engine, GenerationParams
from server.engine.lora import AdapterRejectedError
from server.services.canary_judge import judge_canary
from server.services.routing import Router, Routing
from server.store import registry
from server.store.artifacts import AdapterCache, ArtifactError, ArtifactUnavailableError
from server.store.rollout import get_rollout_state, pinned_adapter

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 120.0  # a loaded CPU host can take long for one token; never block for ever


@dataclass
class Desired:
    """What the registry wants this replica to serve."""

    adapters: dict[str, str]  # name -> path of every version to keep loaded
    active: str | None
    canary: str | None
    pinned: str | None
    share: float
    # name -> (URL, checksum digest) of versions published to a store (None, None: just path)
    sources: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def read_desired(session: Session) -> Desired:
    state = get_rollout_state(session=session)
    active = registry.active_adapter(session=session)
    canary = registry.canary_adapter(session=session)
    pinned = pinned_adapter(session=session)
    rows = [a for a in (active, canary, pinned) if a is not None]
    return Desired(
        adapters={a.name: a.path for a in rows},
        active=active.name if active else None,
        canary=canary.name if canary else None,
        pinned=pinned.name if pinned else None,
        share=state.canary_share,
        sources={a.name: (a.uri, a.artifact_sha256) for a in rows},
    )


@dataclass
class AdapterSync:
    engine: Engine
    session_factory: sessionmaker[Session]
    settings: Settings
    router: Router = field(default_factory=Router)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one change of loaded set at a time
    _managed: set[str] = field(default_factory=set)  # loaded by us (not KAIZEN_ADAPTERS)
    _left_at: dict[str, float] = field(default_factory=dict)  # name -> when it left routing
    cache: AdapterCache | None = None  # default: KAIZEN_ADAPTER_CACHE_DIR

    def _cache(self) -> AdapterCache:
        if self.cache is None:
            assert self.settings.adapter_cache_dir is not None
            self.cache = AdapterCache(
                self.settings.adapter_cache_dir,
                endpoint_url=self.settings.adapter_store_endpoint_url or None,
            )
        return self.cache

    async def _local(
        self, name: str, path: str, source: tuple[str | None, str | None] | None
    ) -> str:
        """The local directory to load ``name`` from: fetched from its store into the cache
        and checked against its registered checksum first. A missing or corrupt object raises
        :class:`AdapterRejectedError`; an unreachable store ArtifactUnavailableError."""
        uri, sha256 = source or (None, None)
        if not uri:
            return path
        try:
            local = await asyncio.to_thread(self._cache().fetch, name, uri, sha256, path)
        except ArtifactUnavailableError:
            raise
        except (ArtifactError, OSError, ValueError) as exc:  # missing, corrupt, unsupported
            raise AdapterRejectedError(f"the artefact of {name} at {uri}: {exc}") from exc
        return str(local)

    def _read(self) -> Desired:
        with self.session_factory() as session:
            return read_desired(session)

    def prime(self) -> None:
        """At start-up: with no version to load (a fresh install), routing is in step with the
        registry already, so readiness need not wait for the first poll."""
        if not self._read().adapters:
            self.router.synced = True

    async def sync(self) -> Routing:
        """Load what the registry wants served, switch the routing, unload what is unused."""
        if not self.engine.is_ready():
            return self.router.routing
        async with self.lock:
            desired = await asyncio.to_thread(self._read)
            loaded = {a.name for a in self.engine.adapters()}
            for name, path in desired.adapters.items():
                if name in loaded or name in self.refused:
                    continue
                try:
                    local = await self._local(name, path, desired.sources.get(name))
                    await self.engine.add_adapter(name, local)
                except ArtifactUnavailableError as exc:
                    log.warning("event=adapter_store_unavailable name=%s reason=%r", name, str(exc))
                    continue  # not refused: the next poll tries again
                except AdapterRejectedError as exc:
                    self.refused[name] = str(exc)
                    log.error("event=adapter_refused name=%s reason=%r", name, str(exc))
                    continue
                self._managed.add(name)
                loaded.add(name)
                await self._warm(name)
                log.info("event=adapter_ready name=%s path=%s", name, path)

            def ok(name: str | None) -> str | None:
                return name if name is not None and name in loaded else None

            routing = Routing(
                active=ok(desired.active),
                canary=ok(desired.canary),
                pinned=ok(desired.pinned),
                canary_share=desired.share,
            )
            if routing != self.router.routing:
                log.info(
                    "event=routing_changed active=%s canary=%s share=%.2f pinned=%s",
                    routing.active,
                    routing.canary,
                    routing.canary_share,
                    routing.pinned,
                )
            self.router.routing = routing
            self.router.synced = True
            await self._unload_unused(routing.names())
            return routing

    async def _unload_unused(self, routed: set[str]) -> None:
        now = time.monotonic()
        for name in sorted(self._managed - routed):
            left = self._left_at.setdefault(name, now)
            in_use = self.router.in_flight.get(name)
            if in_use or now - left < self.settings.rollout_unload_grace_seconds:
                continue
            await self.engine.remove_adapter(name)
            self._managed.discard(name)
            self._left_at.pop(name, None)
            if self.cache is not None:
                await asyncio.to_thread(self.cache.discard, name)  # re-fetched if it returns
            log.info("event=adapter_unloaded name=%s", name)
        for name in routed:
            self._left_at.pop(name, None)

    async def preload(
        self, name: str, path: str, source: tuple[str | None, str | None] | None = None
    ) -> None:
        """Load ``name`` here before the registry routes anybody to it, so that a version the
        engine refuses is refused to ops, with the reason, and nothing changes. Callers hold
        :attr:`lock` (so no poll unloads it before the registry routes to it). Raises
        :class:`AdapterRejectedError` (also when its store does not answer)."""
        if name in {a.name for a in self.engine.adapters()}:
            return
        try:
            local = await self._local(name, path, source)
        except ArtifactUnavailableError as exc:
            raise AdapterRejectedError(f"{exc}; try again when the store is back") from exc
        await self.engine.add_adapter(name, local)
        self._managed.add(name)
        self._left_at[name] = time.monotonic()
        await self._warm(name)

    async def _warm(self, name: str) -> None:
        """One token generated under a version just loaded, before any request is routed to it:
        vLLM brings an adapter's weights into the running batch on its first request, and
        without this a user's first canary requests pay for it (TTFT p99 1.73x steady state).
        A failure here is logged, not fatal: the load itself succeeded."""
        params = GenerationParams(max_tokens=1, temperature=0.0)
        prompt = self.engine.tokenize("def") or [0]
        request_id = f"warmup-{name}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(WARMUP_TIMEOUT_S):
                async for _ in self.engine.generate(
                    request_id=request_id, prompt_token_ids=prompt, params=params, adapter=name
                ):
                    pass
        except Exception:
            log.warning("event=adapter_warmup_failed name=%s", name, exc_info=True)
            return
        log.info(
            "event=adapter_warmed name=%s ms=%.1f", name, (time.perf_counter() - started) * 1000
        )

    def judge_canary(self) -> list[str]:
        with self.session_factory() as session:
            return judge_canary(session=session, settings=self.settings)

    async def run(self) -> None:
        """Poll the registry for ever (a background task of the app)."""
        while True:
            try:
                await self.sync()
                changes = await asyncio.to_thread(self.judge_canary)
                if changes:
                    log.info("event=rollout_auto changes=%r", changes)
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=rollout_sync_failed")
            await asyncio.sleep(self.settings.rollout_poll_seconds)

    def describe(self) -> dict[str, object]:
        return {**self.router.describe(), "refused": dict(self.refused)}
