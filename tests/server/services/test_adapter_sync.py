"""Canary warm-up: a version the registry makes servable is run once, under its own adapter,
before any request is routed to it, so the first users' requests do not pay for its load."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.engine.base import GenerationParams
from server.services.adapter_sync import AdapterSync
from server.store import rollout as rollout_module
from tests.utils.adapters import BASE_SHA, approved_adapter
from tests.utils.fake_engine import FakeEngine


class WatchedEngine(FakeEngine):
    """Notes what the replica routed at the moment each generation started."""

    def __init__(self) -> None:
        super().__init__(base_sha256=BASE_SHA)
        self.service: AdapterSync | None = None
        self.routing_at_generate: list[object] = []

    def generate(self, **kwargs):  # type: ignore[no-untyped-def,override]
        assert self.service is not None
        self.routing_at_generate.append(self.service.router.routing)
        return super().generate(**kwargs)


async def test_a_new_canary_is_warmed_before_it_is_routed(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    approved_adapter(session_factory, tmp_path, "v2")
    with session_factory() as session:
        rollout_module.promote(session=session, name="v2", to="canary", actor="test")
    engine = WatchedEngine()
    service = AdapterSync(engine=engine, session_factory=session_factory, settings=settings)
    engine.service = service

    routing = await service.sync()

    assert routing.canary == "v2"
    (prompt, adapter, params) = engine.requests[0]
    assert adapter == "v2" and params == GenerationParams(max_tokens=1, temperature=0.0)
    assert engine.routing_at_generate[0].canary is None  # type: ignore[attr-defined]
    # Loaded and warmed once: later polls neither load nor warm it again.
    await service.sync()
    assert len(engine.requests) == 1


async def test_a_failed_warm_up_does_not_keep_a_loaded_version_out(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    approved_adapter(session_factory, tmp_path, "v2")
    with session_factory() as session:
        rollout_module.promote(session=session, name="v2", to="canary", actor="test")
    engine = FakeEngine(base_sha256=BASE_SHA, fail_after=0)
    service = AdapterSync(engine=engine, session_factory=session_factory, settings=settings)
    routing = await service.sync()
    assert routing.canary == "v2" and engine.requests and engine.requests[0][1] == "v2"
