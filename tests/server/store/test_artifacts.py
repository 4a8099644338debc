"""Adapter artefacts in an object store, against a real S3-compatible server process (moto's
standalone server): publish -> fetch into a cache -> verify; a corrupt, truncated or missing
object is refused, a store that does not answer is "unavailable" (try again), never refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.lora import check_adapter
from server.store.artifacts import (
    CHECKSUMS,
    AdapterCache,
    ArtifactCorruptError,
    ArtifactUnavailableError,
    publish_adapter,
    restore_to_path,
)
from tests.utils.adapters import BASE_SHA, make_adapter_dir
from tests.utils.s3_server import S3Server, free_port

pytestmark = pytest.mark.usefixtures("aws_env")


def _publish(s3: S3Server, tmp_path: Path, name: str = "kaizen-r1-abcd") -> tuple:  # type: ignore[type-arg]
    bucket = s3.new_bucket()
    adapter = make_adapter_dir(tmp_path / "trainer" / name)
    published = publish_adapter(
        adapter, name=name, store=f"s3://{bucket}/adapters", endpoint_url=s3.endpoint_url
    )
    return bucket, adapter, published


def test_publish_fetch_and_verify(s3: S3Server, tmp_path: Path) -> None:
    bucket, adapter, published = _publish(s3, tmp_path)
    assert published.uri == f"s3://{bucket}/adapters/kaizen-r1-abcd"
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        f"adapters/kaizen-r1-abcd/{f}"
        for f in ("adapter_config.json", "adapter_model.safetensors", CHECKSUMS, "manifest.json")
    ]

    cache = AdapterCache(tmp_path / "replica-cache", endpoint_url=s3.endpoint_url)
    local = cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, str(adapter))
    assert local == tmp_path / "replica-cache" / "kaizen-r1-abcd"
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
        assert (local / name).read_bytes() == (adapter / name).read_bytes()
    assert check_adapter(local, max_rank=16, base_sha256=BASE_SHA) == 8  # the engine's checks
    assert not list((tmp_path / "replica-cache").glob(".*partial"))

    # A second fetch uses the copy it has (verified again, not downloaded).
    s3.client().delete_object(Bucket=bucket, Key=f"adapters/kaizen-r1-abcd/{CHECKSUMS}")
    assert cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, "") == local
    cache.discard("kaizen-r1-abcd")
    assert not local.exists()


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "checksums", "missing", "gone"])
def test_a_corrupt_or_missing_object_is_refused(s3: S3Server, tmp_path: Path, damage: str) -> None:
    bucket, adapter, published = _publish(s3, tmp_path)
    client = s3.client()
    key = "adapters/kaizen-r1-abcd/adapter_model.safetensors"
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    if damage == "overwritten":  # same length, other bytes
        client.put_object(Bucket=bucket, Key=key, Body=weights[:-4] + b"\x01\x02\x03\x04")
    elif damage == "truncated":
        client.put_object(Bucket=bucket, Key=key, Body=weights[:-8])
    elif damage == "checksums":  # weights and their checksum replaced together
        import json

        doc = json.loads(
            client.get_object(Bucket=bucket, Key=f"adapters/kaizen-r1-abcd/{CHECKSUMS}")[
                "Body"
            ].read()
        )
        doc["files"][1]["sha256"] = "0" * 64
        client.put_object(
            Bucket=bucket, Key=f"adapters/kaizen-r1-abcd/{CHECKSUMS}", Body=json.dumps(doc)
        )
    elif damage == "missing":
        client.delete_object(Bucket=bucket, Key=key)
    else:  # the whole version never arrived
        for o in client.list_objects_v2(Bucket=bucket)["Contents"]:
            client.delete_object(Bucket=bucket, Key=o["Key"])
    cache = AdapterCache(tmp_path / "cache", endpoint_url=s3.endpoint_url)
    with pytest.raises(ArtifactCorruptError):
        cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, str(adapter))
    assert not (tmp_path / "cache" / "kaizen-r1-abcd").exists()
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_a_corrupt_cached_copy_is_fetched_again(s3: S3Server, tmp_path: Path) -> None:
    _, adapter, published = _publish(s3, tmp_path)
    cache = AdapterCache(tmp_path / "cache", endpoint_url=s3.endpoint_url)
    local = cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, str(adapter))
    (local / "adapter_model.safetensors").write_bytes(b"garbage")
    again = cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, str(adapter))
    assert (again / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_a_store_that_does_not_answer_is_unavailable_not_corrupt(
    s3: S3Server, tmp_path: Path
) -> None:
    _, adapter, published = _publish(s3, tmp_path)
    down = AdapterCache(tmp_path / "cache", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ArtifactUnavailableError):
        down.fetch("kaizen-r1-abcd", published.uri, published.sha256, str(adapter))


def test_the_default_keeps_adapters_in_place_and_checks_them(tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "rounds" / "round-00001" / "adapter")
    published = publish_adapter(adapter, name="kaizen-r1-abcd", store="")
    assert published.uri == adapter.resolve().as_uri()
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]  # nothing written into the adapter
    cache = AdapterCache(tmp_path / "cache")
    assert cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, "") == adapter
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ArtifactCorruptError, match="registered checksum"):
        cache.fetch("kaizen-r1-abcd", published.uri, published.sha256, "")


def test_a_file_store_on_a_shared_mount(tmp_path: Path) -> None:
    adapter = make_adapter_dir(tmp_path / "trainer" / "x")
    shared = tmp_path / "mnt" / "adapters"
    published = publish_adapter(adapter, name="kaizen-r2-beef", store=shared.as_uri())
    assert published.uri == (shared / "kaizen-r2-beef").as_uri()
    cache = AdapterCache(tmp_path / "cache")
    local = cache.fetch("kaizen-r2-beef", published.uri, published.sha256, "")
    assert local == shared / "kaizen-r2-beef"
    assert check_adapter(local, max_rank=16) == 8
    with pytest.raises(ArtifactCorruptError):
        cache.fetch("kaizen-r2-beef", published.uri, "f" * 64, "")


def test_a_trainer_host_restores_the_parent_it_did_not_train(s3: S3Server, tmp_path: Path) -> None:
    _, adapter, published = _publish(s3, tmp_path)
    rounds = tmp_path / "other-host" / "rounds"
    recorded = rounds / "round-00001" / "train" / "adapter"
    assert restore_to_path(
        published.uri, published.sha256, str(recorded), root=rounds, endpoint_url=s3.endpoint_url
    )
    assert check_adapter(recorded, max_rank=16, base_sha256=BASE_SHA) == 8
    assert not restore_to_path(  # there already
        published.uri, published.sha256, str(recorded), root=rounds, endpoint_url=s3.endpoint_url
    )
    with pytest.raises(Exception, match="outside"):
        restore_to_path(
            published.uri,
            published.sha256,
            str(tmp_path / "elsewhere"),
            root=rounds,
            endpoint_url=s3.endpoint_url,
        )
