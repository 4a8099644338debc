"""benchmarks/hotswap.py without an engine: publishing to the object store the way the run does
(``--adapter-store s3``), and the "change / publish -> all replicas serving" figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.hotswap import (
    ADAPTER_NAMES,
    AdapterStore,
    Change,
    ChangeRun,
    Req,
    World,
    analyse,
    parse_args,
    publish_and_register,
)
from server.store import registry
from server.store.artifacts import AdapterCache, checksum_document
from server.store.db import make_engine, make_session_factory


def _adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"r": 8}\n')
    (path / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    return path


def _world(tmp_path: Path, db_url: str, name: str, local: Path, store: AdapterStore) -> World:
    """A benchmark world holding one adapter to publish, with no servers."""
    return World(
        home=tmp_path,
        model_dir=tmp_path,
        served_name="tiny",
        database_url=db_url,
        ide_token="",
        ops_token="",
        adapters={name: str(local)},
        base_sha256="0" * 64,
        store=store,
        manifests={name: {"kind": "test"}},
    )


def test_publish_and_register_puts_the_adapter_in_the_store_only(
    tmp_path: Path, db_url: str, s3: Any, aws_env: dict[str, str]
) -> None:
    name = ADAPTER_NAMES[0]
    local = _adapter(tmp_path / "adapters" / name)
    expected = checksum_document(local)
    store = AdapterStore("s3", f"s3://{s3.new_bucket()}/adapters", s3.endpoint_url, aws_env)
    world = _world(tmp_path, db_url, name, local, store)
    timings = publish_and_register(world, name)
    assert timings["publish_s"] >= 0 and timings["register_s"] >= 0
    assert timings["uri"] == f"{store.url}/{name}"
    assert not local.exists()  # a replica can only have it from the store
    assert world.registered == {name}
    db = make_engine(db_url)
    try:
        with make_session_factory(db)() as session:
            row = registry.get_adapter(session=session, name=name)
            assert row is not None and row.state == "approved"
            assert row.uri == timings["uri"] and row.artifact_sha256
            sha = row.artifact_sha256
    finally:
        db.dispose()
    # What a replica does with it: fetch into its own cache, verified against the registry.
    env = store.replica_env(tmp_path / "replica-1" / "adapter-cache")
    assert env["KAIZEN_ADAPTER_STORE"] == store.url
    assert env["KAIZEN_ADAPTER_STORE_ENDPOINT_URL"] == s3.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == aws_env["AWS_ACCESS_KEY_ID"]
    cache = AdapterCache(Path(env["KAIZEN_ADAPTER_CACHE_DIR"]), endpoint_url=s3.endpoint_url)
    fetched = cache.fetch(name, timings["uri"], sha, str(local))
    assert fetched == tmp_path / "replica-1" / "adapter-cache" / name
    assert checksum_document(fetched) == expected


def test_a_file_store_is_a_shared_mount_read_in_place(tmp_path: Path, db_url: str) -> None:
    name = ADAPTER_NAMES[1]
    local = _adapter(tmp_path / "adapters" / name)
    store = AdapterStore("file", (tmp_path / "store").as_uri(), None, {})
    world = _world(tmp_path, db_url, name, local, store)
    timings = publish_and_register(world, name)
    copy = tmp_path / "store" / name
    assert timings["uri"] == copy.resolve().as_uri()
    assert "KAIZEN_ADAPTER_STORE_ENDPOINT_URL" not in store.replica_env(tmp_path / "c")
    fetched = AdapterCache(tmp_path / "c").fetch(name, timings["uri"], None, str(local))
    assert fetched == copy.resolve() and not (tmp_path / "c").exists()  # no cache copy


def _reqs(replica: int, switch_at: float, old: str, new: str, until: float) -> list[Req]:
    """A request every 0.5 s on one replica, served by ``old`` before ``switch_at``."""
    out, t = [], 0.0
    while t < until:
        out.append(
            Req(replica, 0, len(out), 0, t, end=t + 0.4, adapter=new if t >= switch_at else old)
        )
        out[-1].ok = True
        t += 0.5
    return out


def _run(published: float | None) -> ChangeRun:
    change = Change("promote A to canary", "canary A", "canary", "hotswap-a", "hotswap-a")
    publish = None if published is None else {"publish_s": 0.1, "register_s": 0.1, "uri": "s3://b"}
    return ChangeRun(change, 10.0, 10.2, 200, {}, "hotswap-a", published, publish)


def test_all_replicas_serving_is_the_slowest_replica_and_publish_adds_what_came_before() -> None:
    reqs = _reqs(1, 11.0, "base", "hotswap-a", 30) + _reqs(2, 14.0, "base", "hotswap-a", 30)
    marks = {"warmup_end": 2.0, "stop": 30.0, "end": 30.5}
    [entry], _ = analyse(reqs, [_run(9.5)], marks, 2, 2.0)
    assert entry["replicas"][1]["swap_s"] == pytest.approx(1.0)
    assert entry["replicas"][2]["swap_s"] == pytest.approx(4.0)
    assert entry["change_to_all_serving_s"] == pytest.approx(4.0)
    assert entry["publish_to_all_serving_s"] == pytest.approx(4.5)  # 0.5 s before the change
    assert entry["publish"]["uri"] == "s3://b"

    [unpublished], _ = analyse(reqs, [_run(None)], marks, 2, 2.0)
    assert unpublished["change_to_all_serving_s"] == pytest.approx(4.0)
    assert unpublished["publish_to_all_serving_s"] is None and unpublished["publish"] is None


def test_a_replica_that_never_switches_leaves_all_serving_open() -> None:
    reqs = _reqs(1, 11.0, "base", "hotswap-a", 30) + _reqs(2, 99.0, "base", "hotswap-a", 30)
    marks = {"warmup_end": 2.0, "stop": 30.0, "end": 30.5}
    [entry], _ = analyse(reqs, [_run(9.5)], marks, 2, 2.0)
    assert entry["replicas"][2]["complete"] is False
    assert entry["change_to_all_serving_s"] is None
    assert entry["publish_to_all_serving_s"] is None


def test_the_adapter_store_option() -> None:
    db = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    assert parse_args([]).adapter_store == "none"
    args = parse_args(["--replicas", "2", "--database-url", db, "--adapter-store", "s3"])
    assert args.adapter_store == "s3"
    with pytest.raises(SystemExit):
        parse_args(["--adapter-store", "gcs"])
