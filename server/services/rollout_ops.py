"""The ops side of rollout: the registry moves ops ask for (promote, roll back, pin, change the
split), carried out through :mod:`server.store.rollout` and followed at once by an engine sync
here, and the views of the registry the ops API shows (versions with their online statistics,
one version's manifest and history, the rollout state and this replica's routing).

Where ops promote or pin a version, this replica loads it first (under the sync's lock), so a
version the engine refuses is refused to ops with the reason, and the registry does not move.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from server.engine.lora import AdapterRejectedError
from server.errors import ApiError
from server.protocol.rollout import (
    AdapterDetailOut,
    AdapterList,
    AdapterOut,
    OnlineStats,
    RolloutChange,
    RolloutOut,
    RolloutUpdate,
    TransitionOut,
)
from server.services.adapter_sync import AdapterSync
from server.store import registry
from server.store.feedback import adapter_stats
from server.store.models import Adapter
from server.store.rollout import (
    RolloutError,
    get_rollout_state,
    pin,
    pinned_adapter,
    promote,
    rollback,
    set_rollout_state,
)

log = logging.getLogger(__name__)


@dataclass
class RolloutOps:
    sync: AdapterSync

    async def _preload(self, name: str) -> None:
        def where() -> tuple[str, tuple[str | None, str | None]]:
            with self.sync.session_factory() as session:
                adapter = registry.require_adapter(session=session, name=name)
                return adapter.path, (adapter.uri, adapter.artifact_sha256)

        path, source = await asyncio.to_thread(where)
        try:
            await self.sync.preload(name, path, source)
        except AdapterRejectedError as exc:
            raise ApiError(422, f"Adapter {name} refused: {exc}", code="adapter_refused") from exc

    async def _change(self, work: Any, *, preload: str | None = None) -> RolloutChange:
        def run() -> list[str]:
            with self.sync.session_factory() as session:
                return work(session)

        try:
            async with self.sync.lock:
                if preload is not None:
                    await self._preload(preload)
                changes = await asyncio.to_thread(run)
        except LookupError as exc:
            raise ApiError(404, str(exc), code="adapter_not_found") from exc
        except (RolloutError, registry.TransitionError) as exc:
            raise ApiError(409, str(exc), code="invalid_transition") from exc
        await self.sync.sync()
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
            with self.sync.session_factory() as session:
                state = get_rollout_state(session=session)
                active = registry.active_adapter(session=session)
                canary = registry.canary_adapter(session=session)
                pinned = pinned_adapter(session=session)
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
                    replica=self.sync.describe(),
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
        return {a.name for a in self.sync.engine.adapters()}

    def _stats(self, session: Session) -> dict[str | None, Any]:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return {
            st.adapter: st
            for st in adapter_stats(session=session, since=epoch, until=datetime.now(UTC))
        }

    async def list_adapters(self) -> AdapterList:
        def read() -> AdapterList:
            with self.sync.session_factory() as session:
                stats, loaded = self._stats(session), self._loaded()
                rows = [
                    self._out(session, a, stats, loaded)
                    for a in registry.list_adapters(session=session)
                ]
                return AdapterList(data=rows, count=len(rows))

        return await asyncio.to_thread(read)

    async def adapter_detail(self, name: str) -> AdapterDetailOut:
        def read() -> AdapterDetailOut:
            with self.sync.session_factory() as session:
                adapter = registry.require_adapter(session=session, name=name)
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
