"""A replica's sync with versions in an object store (a real moto server process): a store
that does not answer is tried again at the next poll (not refused), a missing object is refused
and serving goes on, an ops promotion of a corrupt one is refused with the reason, and a
version's cached copy goes when it is unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.engine.lora import AdapterRejectedError
from server.services.adapter_sync import AdapterSync
from server.store import registry
from server.store.artifacts import AdapterCache, publish_adapter
from server.store.rollout import promote
from tests.utils.adapters import BASE_SHA, make_adapter_dir
from tests.utils.fake_engine import FakeEngine
from tests.utils.s3_server import S3Server, free_port

pytestmark = pytest.mark.usefixtures("aws_env")


def publish(factory: sessionmaker[Session], s3: S3Server, bucket: str, root: Path, name: str):  # type: ignore[no-untyped-def]
    adapter = make_adapter_dir(root / name)
    published = publish_adapter(
        adapter, name=name, store=f"s3://{bucket}/a", endpoint_url=s3.endpoint_url
    )
    with factory() as session:
        row = registry.register_adapter(
            session=session,
            name=name,
            path=str(root / "not-on-this-host" / name),
            base_sha256=BASE_SHA,
            manifest={},
            parent_id=None,
            round_id=None,
            actor="trainer",
            artifact=published,
        )
        for state in ("evaluating", "approved"):
            registry.transition(session=session, adapter=row, to_state=state, actor="gate")
    return published


async def test_an_unreachable_store_is_retried_and_a_missing_object_refused(
    settings: Settings, session_factory: sessionmaker[Session], s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    publish(session_factory, s3, bucket, tmp_path / "trainer", "v1")
    with session_factory() as session:
        promote(session=session, name="v1", to="active", actor="test")
    engine = FakeEngine(base_sha256=BASE_SHA)
    down = AdapterCache(tmp_path / "cache", endpoint_url=f"http://127.0.0.1:{free_port()}")
    service = AdapterSync(
        engine=engine, session_factory=session_factory, settings=settings, cache=down
    )

    routing = await service.sync()
    assert routing.active is None and service.refused == {}  # the base serves meanwhile
    service.cache = AdapterCache(tmp_path / "cache", endpoint_url=s3.endpoint_url)
    routing = await service.sync()
    assert routing.active == "v1"
    loaded = {a.name: a.path for a in engine.adapters()}
    assert loaded["v1"] == str(tmp_path / "cache" / "v1")

    publish(session_factory, s3, bucket, tmp_path / "trainer", "v2")
    s3.client().delete_object(Bucket=bucket, Key="a/v2/adapter_model.safetensors")
    with session_factory() as session:
        promote(session=session, name="v2", to="active", actor="test")
    routing = await service.sync()
    assert "missing" in service.refused["v2"]
    # As with a corrupt directory: not routed to, nothing else touched, the replica serves on.
    assert routing.active is None
    assert {a.name for a in engine.adapters()} == set(loaded)


async def test_preloading_a_corrupt_version_is_refused_with_the_reason(
    settings: Settings, session_factory: sessionmaker[Session], s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    published = publish(session_factory, s3, bucket, tmp_path / "trainer", "v1")
    s3.client().put_object(Bucket=bucket, Key="a/v1/adapter_config.json", Body=b'{"r": 64}')
    service = AdapterSync(
        engine=FakeEngine(base_sha256=BASE_SHA),
        session_factory=session_factory,
        settings=settings.model_copy(update={"adapter_store_endpoint_url": s3.endpoint_url}),
    )
    with pytest.raises(AdapterRejectedError, match="checksum"):
        await service.preload("v1", "", (published.uri, published.sha256))
    assert not (settings.home / "adapter-cache" / "v1").exists()


async def test_an_unloaded_version_leaves_the_cache(
    settings: Settings, session_factory: sessionmaker[Session], s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    for name in ("v1", "v2"):
        publish(session_factory, s3, bucket, tmp_path / "trainer", name)
    quick = settings.model_copy(
        update={"adapter_store_endpoint_url": s3.endpoint_url, "rollout_unload_grace_seconds": 0}
    )
    service = AdapterSync(
        engine=FakeEngine(base_sha256=BASE_SHA), session_factory=session_factory, settings=quick
    )
    with session_factory() as session:
        promote(session=session, name="v1", to="active", actor="test")
    await service.sync()
    cached = settings.home / "adapter-cache"
    assert (cached / "v1").is_dir()
    with session_factory() as session:
        promote(session=session, name="v2", to="active", actor="test")
    await service.sync()
    await service.sync()
    assert (cached / "v2").is_dir() and not (cached / "v1").exists()
