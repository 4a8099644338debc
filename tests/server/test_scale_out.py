"""Scaling out: two server replicas on one PostgreSQL database and no shared disk serve the
version the trainer published to an S3-compatible store (a real moto server process).

The replicas run the real app on loopback (uvicorn) with the scripted engine, whose replies
name the adapter that served them; everything between the registry and the engine is the real
path: the registry poll, the download into each replica's own cache, the checksum, the
engine's adapter checks (:func:`server.engine.lora.check_adapter`), warm-up and routing."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import create_app
from server.config import Settings
from server.store import registry
from server.store.artifacts import publish_adapter
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.rollout import promote, set_rollout_state
from server.store.tokens import Role, create_token
from tests.utils.adapters import BASE_SHA, make_adapter_dir
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import converge, live_server, served_by
from tests.utils.postgres import pg_database
from tests.utils.s3_server import S3Server

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("aws_env")]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


def trainer_publishes(factory, store: str, endpoint: str, root: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    """What a round does at its end (trainer.round): publish, then register the candidate;
    the gate then approves it."""
    adapter = make_adapter_dir(root / name / "train" / "adapter")
    published = publish_adapter(adapter, name=name, store=store, endpoint_url=endpoint)
    with factory() as session:
        row = registry.register_adapter(
            session=session,
            name=name,
            path=str(adapter),
            base_sha256=BASE_SHA,
            manifest={"base_model": {"sha256": BASE_SHA}},
            parent_id=None,
            round_id=None,
            actor="trainer",
            artifact=published,
        )
        for state in ("evaluating", "approved"):
            registry.transition(session=session, adapter=row, to_state=state, actor="gate")
    return adapter


def test_two_replicas_with_no_shared_disk_serve_what_the_trainer_published(
    pg_url: str, s3: S3Server, tmp_path: Path
) -> None:
    upgrade(pg_url)
    db = make_engine(pg_url)
    factory = make_session_factory(db)
    with factory() as session:
        ide = create_token(session=session, name="ide", role=Role.IDE)[1]
    bucket = s3.new_bucket()
    store = f"s3://{bucket}/kaizen/adapters"
    trainer_disk = tmp_path / "trainer-host"
    trainer_publishes(factory, store, s3.endpoint_url, trainer_disk, "kaizen-r1-0a0a0a0a")
    with factory() as session:
        promote(session=session, name="kaizen-r1-0a0a0a0a", to="active", actor="trainer")
    shutil.rmtree(trainer_disk)  # the replicas could not read it anyway: it is another host's

    def replica(host: str) -> Settings:
        return Settings(  # type: ignore[call-arg]
            _env_file=None,
            home=tmp_path / host,
            database_url=pg_url,
            rollout_poll_seconds=0.2,
            adapter_store=store,
            adapter_store_endpoint_url=s3.endpoint_url,
        )

    app_a = create_app(replica("replica-a"), engine=FakeEngine(base_sha256=BASE_SHA))
    app_b = create_app(replica("replica-b"), engine=FakeEngine(base_sha256=BASE_SHA))
    with live_server(app_a) as a, live_server(app_b) as b:
        for url in (a.url, b.url):
            converge(url, ide, "kaizen-r1-0a0a0a0a", timeout=30)
        for host in ("replica-a", "replica-b"):  # each fetched its own copy
            copy = tmp_path / host / "adapter-cache" / "kaizen-r1-0a0a0a0a"
            assert (copy / "adapter_model.safetensors").is_file()

        # The next round's version reaches both as the canary...
        trainer_publishes(factory, store, s3.endpoint_url, trainer_disk, "kaizen-r2-0b0b0b0b")
        with factory() as session:
            promote(session=session, name="kaizen-r2-0b0b0b0b", to="canary", actor="trainer")
            set_rollout_state(session=session, actor="test", canary_share=1.0)
        for url in (a.url, b.url):
            converge(url, ide, "kaizen-r2-0b0b0b0b", timeout=30)

        # ...one whose object was damaged in the store after publishing is refused by both,
        # and they go on serving what they served.
        with factory() as session:
            promote(session=session, name="kaizen-r2-0b0b0b0b", to="active", actor="test")
        trainer_publishes(factory, store, s3.endpoint_url, trainer_disk, "kaizen-r3-0c0c0c0c")
        key = "kaizen/adapters/kaizen-r3-0c0c0c0c/adapter_model.safetensors"
        body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.client().put_object(Bucket=bucket, Key=key, Body=body[:-1] + b"\xff")
        with factory() as session:
            promote(session=session, name="kaizen-r3-0c0c0c0c", to="canary", actor="trainer")
        for app, url in ((app_a, a.url), (app_b, b.url)):
            deadline = time.monotonic() + 30
            while "kaizen-r3-0c0c0c0c" not in app.state.adapter_sync.refused:
                assert time.monotonic() < deadline, "the corrupt version was not refused"
                time.sleep(0.1)
            assert "checksum" in app.state.adapter_sync.refused["kaizen-r3-0c0c0c0c"]
            assert served_by(url, ide) == "kaizen-r2-0b0b0b0b"
            assert not (app.state.settings.adapter_cache_dir / "kaizen-r3-0c0c0c0c").exists()
    db.dispose()
