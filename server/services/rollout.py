"""Rollout: which adapter version serves each request, hot-swapped from the registry, with a
canary that is promoted or rolled back on what users and CI say about it.

* Requests that name the base model are routed (:meth:`RolloutService.route`): to the pinned
  version if ops pinned one; else to the canary for a sticky share of tokens (a token's hash
  decides, so one developer sees one version); else to the active version; else the base.
  A request names one adapter from its first token to its last: the route is taken once.
* Every replica polls the registry (``KAIZEN_ROLLOUT_POLL_SECONDS``) and loads what became
  active, canary or pinned under the version's own never-reused name, before routing to it.
  A version that cannot be loaded (corrupt, another base model, rank over the limit) is
  refused, logged and left out of routing; serving goes on with what was there. A version
  that left routing is unloaded once no request uses it and a grace period has passed.
* The canary is judged by a sequential test on acceptance and CI pass rates of the
  completions served since it started (:mod:`server.services.canary`; developer fixes are
  left out of the pass rate), promoted or rolled back at the first poll where the test
  decides. Registry moves are compare-and-set and each operation is one transaction, so when
  replicas decide at once only one move happens, and a crash leaves no half-made move.

The promote/rollback/pin operations are plain functions on a session, shared by the ops API and
the ``kaizen`` CLI; every one writes the registry's audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.api.rollout_protocol import (
    AdapterDetailOut,
    AdapterList,
    AdapterOut,
    OnlineStats,
    RolloutChange,
    RolloutOut,
    RolloutUpdate,
    TransitionOut,
)
from server.config import Settings
from server.engine.adapters import AdapterRejectedError
from server.engine.base import Engine, GenerationParams
from server.errors import ApiError
from server.services.canary import CanaryConfig, MetricCounts
from server.services.canary import decide as decide_canary
from server.store import adapters as registry
from server.store.canary import canary_counts
from server.store.feedback import adapter_stats
from server.store.models import Adapter
from server.store.rollout import get_rollout_state, set_rollout_state
from server.store.tokens import Principal

log = logging.getLogger(__name__)

SERVABLE = ("approved", "canary", "active", "retired")
WARMUP_TIMEOUT_S = 120.0  # a loaded CPU host can take long for one token; never block for ever


class RolloutError(ValueError):
    """An ops request the registry cannot carry out (wrong state, unknown name, nothing to do)."""


# -- operations on the registry (API and CLI) -------------------------------------------------


def _get(session: Session, name: str) -> Adapter:
    adapter = registry.get_adapter(session=session, name=name)
    if adapter is None:
        raise LookupError(f"no adapter named {name!r}; `kaizen adapters list` shows them")
    return adapter


def promote(*, session: Session, name: str, to: str, actor: str, reason: str = "") -> list[str]:
    """Make ``name`` the canary or the active version; returns what changed, in words.

    To ``canary``: it must be approved; a previous canary is retired. To ``active``: it must be
    approved or the canary; the previous active version is retired (a rollback restores it).
    One transaction: all of it happens, or (error, crash) none of it.
    """
    with registry.atomic(session):
        return _promote(session=session, name=name, to=to, actor=actor, reason=reason)


def rollback(*, session: Session, actor: str, reason: str = "") -> list[str]:
    """Take back the newest change: retire the canary if there is one; else retire the active
    version and restore the one that was active before it (or the base model). One
    transaction, like :func:`promote`."""
    with registry.atomic(session):
        return _rollback(session=session, actor=actor, reason=reason)


def _promote(*, session: Session, name: str, to: str, actor: str, reason: str) -> list[str]:
    if to not in ("canary", "active"):
        raise RolloutError(f"promote to 'canary' or 'active', not {to!r}")
    adapter = _get(session, name)
    changes: list[str] = []
    try:
        if to == "canary":
            registry.transition(
                session=session,
                adapter=adapter,
                to_state="canary",
                actor=actor,
                reason=reason or "promoted to canary",
            )
            old = [
                a
                for a in registry.list_adapters(session=session, states=["canary"])
                if a.id != adapter.id
            ]
            for a in old:
                registry.transition(
                    session=session,
                    adapter=a,
                    to_state="retired",
                    actor=actor,
                    reason=f"canary replaced by {name}",
                )
                changes.append(f"retired canary {a.name}")
            set_rollout_state(session=session, actor=actor, canary_started_at=datetime.now(UTC))
            changes.append(f"{name} is the canary")
            return changes
        was_canary = adapter.state == "canary"
        current = registry.active_adapter(session=session)
        registry.transition(
            session=session,
            adapter=adapter,
            to_state="active",
            actor=actor,
            reason=reason or "promoted to active",
        )
        fields: dict[str, Any] = {}
        if current is None or current.id != adapter.id:
            if current is not None:
                registry.transition(
                    session=session,
                    adapter=current,
                    to_state="retired",
                    actor=actor,
                    reason=f"replaced by {name}",
                )
                changes.append(f"retired {current.name}")
            history = get_rollout_state(session=session).active_history or []
            fields["active_history"] = [*history, current.id if current else None]
        if was_canary:
            fields["canary_started_at"] = None
        if fields:
            set_rollout_state(session=session, actor=actor, **fields)
        changes.append(f"{name} is active")
        return changes
    except registry.TransitionError as exc:
        raise RolloutError(str(exc)) from exc


def _rollback(*, session: Session, actor: str, reason: str) -> list[str]:
    canary = registry.canary_adapter(session=session)
    why = reason or "rolled back"
    if canary is not None:
        registry.transition(
            session=session, adapter=canary, to_state="retired", actor=actor, reason=why
        )
        set_rollout_state(session=session, actor=actor, canary_started_at=None)
        return [f"retired canary {canary.name}"]
    active = registry.active_adapter(session=session)
    if active is None:
        raise RolloutError("nothing to roll back: no canary and no active adapter")
    # What was active before this one: the top of the stack promotions push (skipping versions
    # that have since been moved elsewhere by hand); an empty stack means the base model.
    history = list(get_rollout_state(session=session).active_history or [])
    previous: Adapter | None = None
    while history:
        candidate_id = history.pop()
        if candidate_id is None:
            break
        found = session.get(Adapter, candidate_id)
        if found is not None and found.state == "retired" and found.id != active.id:
            previous = found
            break
    registry.transition(
        session=session, adapter=active, to_state="retired", actor=actor, reason=why
    )
    changes = [f"retired {active.name}"]
    if previous is not None:
        registry.transition(
            session=session,
            adapter=previous,
            to_state="active",
            actor=actor,
            reason=f"restored by rollback of {active.name}",
        )
        changes.append(f"{previous.name} is active again")
    else:
        changes.append("the base model serves")
    set_rollout_state(session=session, actor=actor, active_history=history)
    return changes


def pin(*, session: Session, name: str | None, actor: str) -> list[str]:
    """Serve ``name`` to everybody (no canary, no automatic moves) or, with None, unpin."""
    if name is None:
        set_rollout_state(session=session, actor=actor, pinned_adapter_id=None)
        return ["unpinned"]
    adapter = _get(session, name)
    if adapter.state not in SERVABLE:
        raise RolloutError(
            f"adapter {name} is {adapter.state}; only {', '.join(SERVABLE)} versions can be pinned"
        )
    set_rollout_state(session=session, actor=actor, pinned_adapter_id=adapter.id)
    return [f"pinned {name}"]


# -- routing in a replica ---------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """What a replica routes to now (adapter names the engine has loaded)."""

    active: str | None = None
    canary: str | None = None
    pinned: str | None = None
    canary_share: float = 0.0


def in_canary(token_id: int | None, share: float) -> bool:
    """Sticky: the same token always lands on the same side for a given share."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"kaizen-canary:{token_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class _Desired:
    adapters: dict[str, str]  # name -> path of every version to keep loaded
    active: str | None
    canary: str | None
    pinned: str | None
    share: float
    auto: bool
    canary_started_at: datetime | None


@dataclass
class RolloutService:
    engine: Engine
    session_factory: sessionmaker[Session]
    settings: Settings
    routing: Routing = field(default_factory=Routing)
    synced: bool = False  # the registry was read and loaded at least once
    refused: dict[str, str] = field(default_factory=dict)  # name -> why
    _managed: set[str] = field(default_factory=set)  # loaded by us (not KAIZEN_ADAPTERS)
    _left_at: dict[str, float] = field(default_factory=dict)  # name -> when it left routing
    _in_flight: Counter[str] = field(default_factory=Counter)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # requests

    def route(self, principal: Principal) -> str | None:
        r = self.routing
        if r.pinned is not None:
            return r.pinned
        if r.canary is not None and in_canary(principal.token_id, r.canary_share):
            return r.canary
        return r.active

    def acquire(self, adapter: str | None) -> None:
        if adapter is not None:
            self._in_flight[adapter] += 1

    def release(self, adapter: str | None) -> None:
        if adapter is not None:
            self._in_flight[adapter] -= 1
            if self._in_flight[adapter] <= 0:
                del self._in_flight[adapter]

    # the registry -> the engine

    def _read(self) -> _Desired:
        with self.session_factory() as session:
            state = get_rollout_state(session=session)
            active = registry.active_adapter(session=session)
            canary = registry.canary_adapter(session=session)
            pinned = (
                session.get(Adapter, state.pinned_adapter_id) if state.pinned_adapter_id else None
            )
            rows = [a for a in (active, canary, pinned) if a is not None]
            return _Desired(
                adapters={a.name: a.path for a in rows},
                active=active.name if active else None,
                canary=canary.name if canary else None,
                pinned=pinned.name if pinned else None,
                share=state.canary_share,
                auto=state.auto_rollout,
                canary_started_at=state.canary_started_at,
            )

    def prime(self) -> None:
        """At start-up: with no version to load (a fresh install), routing is in step with the
        registry already, so readiness need not wait for the first poll."""
        if not self._read().adapters:
            self.synced = True

    async def sync(self) -> Routing:
        """Load what the registry wants served, switch the routing, unload what is unused."""
        if not self.engine.is_ready():
            return self.routing
        async with self._lock:
            desired = await asyncio.to_thread(self._read)
            loaded = {a.name for a in self.engine.adapters()}
            for name, path in desired.adapters.items():
                if name in loaded or name in self.refused:
                    continue
                try:
                    await self.engine.add_adapter(name, path)
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
            if routing != self.routing:
                log.info(
                    "event=routing_changed active=%s canary=%s share=%.2f pinned=%s",
                    routing.active,
                    routing.canary,
                    routing.canary_share,
                    routing.pinned,
                )
            self.routing = routing
            self.synced = True
            await self._unload_unused({routing.active, routing.canary, routing.pinned})
            return routing

    async def _unload_unused(self, routed: set[str | None]) -> None:
        now = time.monotonic()
        for name in sorted(self._managed - {n for n in routed if n}):
            left = self._left_at.setdefault(name, now)
            if self._in_flight.get(name) or now - left < self.settings.rollout_unload_grace_seconds:
                continue
            await self.engine.remove_adapter(name)
            self._managed.discard(name)
            self._left_at.pop(name, None)
            log.info("event=adapter_unloaded name=%s", name)
        for name in routed:
            if name:
                self._left_at.pop(name, None)

    # the canary

    def judge_canary(self) -> list[str]:
        """Promote or roll back the canary by the sequential rule of
        :mod:`server.services.canary`; returns what changed (nothing while paused, pinned or
        undecided). The decision and its evidence go to the audit trail (the transition's
        reason) and onto the canary (``evaluation["canary"]``), in the same transaction as the
        move."""
        config = CanaryConfig.from_settings(self.settings)
        with self.session_factory() as session:
            state = get_rollout_state(session=session)
            canary = registry.canary_adapter(session=session)
            active = registry.active_adapter(session=session)
            if (
                not state.auto_rollout
                or state.pinned_adapter_id is not None
                or canary is None
                or state.canary_started_at is None
            ):
                return []
            now = datetime.now(UTC)
            active_name = active.name if active else None
            # Only completions served while the canary ran, on both sides.
            counts = canary_counts(
                session=session,
                adapters=[canary.name, active_name],
                since=state.canary_started_at,
                until=now,
            )
            new, old = counts[canary.name], counts[active_name]
            result = decide_canary(
                {
                    "acceptance": MetricCounts(new.accepted, new.shown, old.accepted, old.shown),
                    "ci_pass": MetricCounts(new.passed, new.judged, old.passed, old.judged),
                },
                config,
                hours=(now - state.canary_started_at).total_seconds() / 3600,
            )
            if result.action == "wait":
                return []
            canary.evaluation = {
                **(canary.evaluation or {}),
                "canary": {
                    "decision": result.action,
                    "reason": result.reason,
                    "against": active_name,
                    "since": state.canary_started_at.isoformat(),
                    "until": now.isoformat(),
                    "counts": {
                        "canary": asdict(new),
                        "active": asdict(old),
                    },
                    "evidence": result.evidence,
                    "config": asdict(config),
                },
            }
            try:
                if result.action == "rollback":
                    log.warning("event=canary_rollback name=%s %s", canary.name, result.reason)
                    return rollback(
                        session=session, actor="canary", reason=f"canary {result.reason}"
                    )
                log.info("event=canary_promote name=%s %s", canary.name, result.reason)
                return promote(
                    session=session,
                    name=canary.name,
                    to="active",
                    actor="canary",
                    reason=f"canary {result.reason}",
                )
            except (RolloutError, registry.TransitionError) as exc:
                # Another replica decided first.
                log.info("event=canary_decided_elsewhere reason=%r", str(exc))
                return []

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

    # the ops API

    async def _preload(self, name: str) -> None:
        """Load ``name`` here before the registry routes anybody to it, so that a version the
        engine refuses is refused to ops, with the reason, and nothing changes. Callers hold
        ``self._lock`` (so no poll unloads it before the registry routes to it)."""
        if name in {a.name for a in self.engine.adapters()}:
            return
        path = await asyncio.to_thread(self._path_of, name)
        try:
            await self.engine.add_adapter(name, path)
        except AdapterRejectedError as exc:
            raise ApiError(422, f"Adapter {name} refused: {exc}", code="adapter_refused") from exc
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

    def _path_of(self, name: str) -> str:
        with self.session_factory() as session:
            return _get(session, name).path

    async def _change(self, work: Any, *, preload: str | None = None) -> RolloutChange:
        def run() -> list[str]:
            with self.session_factory() as session:
                return work(session)

        try:
            async with self._lock:
                if preload is not None:
                    await self._preload(preload)
                changes = await asyncio.to_thread(run)
        except LookupError as exc:
            raise ApiError(404, str(exc), code="adapter_not_found") from exc
        except (RolloutError, registry.TransitionError) as exc:
            raise ApiError(409, str(exc), code="invalid_transition") from exc
        await self.sync()
        log.info("event=rollout_change changes=%r", changes)
        return RolloutChange(changes=changes, rollout=await self.state())

    async def promote(self, name: str, to: str, *, actor: str, reason: str = "") -> RolloutChange:
        return await self._change(
            lambda session: promote(session=session, name=name, to=to, actor=actor, reason=reason),
            preload=name,
        )

    async def rollback(self, *, actor: str, reason: str = "") -> RolloutChange:
        # What a rollback restores is loaded by the sync that follows (it was served before).
        return await self._change(
            lambda session: rollback(session=session, actor=actor, reason=reason)
        )

    async def update(self, body: RolloutUpdate, *, actor: str) -> RolloutChange:
        fields = body.model_dump(exclude_unset=True)
        pinned = fields.pop("pinned", ...)

        def work(session: Session) -> list[str]:
            changes = []
            if fields:
                set_rollout_state(session=session, actor=actor, **fields)
                changes += [f"{k} = {v}" for k, v in fields.items()]
            if pinned is not ...:
                changes += pin(session=session, name=pinned, actor=actor)
            return changes

        preload = pinned if isinstance(pinned, str) else None
        return await self._change(work, preload=preload)

    async def state(self) -> RolloutOut:
        def read() -> RolloutOut:
            with self.session_factory() as session:
                state = get_rollout_state(session=session)
                active = registry.active_adapter(session=session)
                canary = registry.canary_adapter(session=session)
                pinned = (
                    session.get(Adapter, state.pinned_adapter_id)
                    if state.pinned_adapter_id
                    else None
                )
                return RolloutOut(
                    active=active.name if active else None,
                    canary=canary.name if canary else None,
                    pinned=pinned.name if pinned else None,
                    canary_share=state.canary_share,
                    auto_rollout=state.auto_rollout,
                    training_paused=state.training_paused,
                    canary_started_at=state.canary_started_at,
                    updated_at=state.updated_at,
                    updated_by=state.updated_by,
                    replica=self.describe(),
                )

        return await asyncio.to_thread(read)

    def _out(
        self, session: Session, adapter: Adapter, stats: dict[str | None, Any], loaded: set[str]
    ) -> AdapterOut:
        parent = session.get(Adapter, adapter.parent_id) if adapter.parent_id else None
        online = stats.get(adapter.name)
        return AdapterOut(
            name=adapter.name,
            state=adapter.state,
            parent=parent.name if parent else None,
            round_id=adapter.round_id,
            path=adapter.path,
            base_sha256=adapter.base_sha256,
            created_at=adapter.created_at,
            updated_at=adapter.updated_at,
            evaluation=adapter.evaluation,
            online=OnlineStats(**{k: getattr(online, k) for k in OnlineStats.model_fields})
            if online is not None
            else OnlineStats(),
            loaded_here=adapter.name in loaded,
        )

    def _loaded(self) -> set[str]:
        return {a.name for a in self.engine.adapters()}

    def _stats(self, session: Session) -> dict[str | None, Any]:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return {
            st.adapter: st
            for st in adapter_stats(session=session, since=epoch, until=datetime.now(UTC))
        }

    async def list_adapters(self) -> AdapterList:
        def read() -> AdapterList:
            with self.session_factory() as session:
                stats, loaded = self._stats(session), self._loaded()
                rows = [
                    self._out(session, a, stats, loaded)
                    for a in registry.list_adapters(session=session)
                ]
                return AdapterList(data=rows, count=len(rows))

        return await asyncio.to_thread(read)

    async def adapter_detail(self, name: str) -> AdapterDetailOut:
        def read() -> AdapterDetailOut:
            with self.session_factory() as session:
                adapter = _get(session, name)
                out = self._out(session, adapter, self._stats(session), self._loaded())
                return AdapterDetailOut(
                    **out.model_dump(),
                    manifest=adapter.manifest,
                    history=[
                        TransitionOut.model_validate(t)
                        for t in registry.history(session=session, adapter_id=adapter.id)
                    ],
                )

        try:
            return await asyncio.to_thread(read)
        except LookupError as exc:
            raise ApiError(404, str(exc), code="adapter_not_found") from exc

    def describe(self) -> dict[str, Any]:
        r = self.routing
        return {
            "active": r.active,
            "canary": r.canary,
            "pinned": r.pinned,
            "canary_share": r.canary_share,
            "refused": dict(self.refused),
            "in_flight": dict(self._in_flight),
        }
