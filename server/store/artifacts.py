"""Adapter artefacts in an object store: what the trainer publishes, what a replica fetches.

The registry records where a version's files are as a URL (``Adapter.uri``) and the SHA-256 of
its checksum document (``Adapter.artifact_sha256``, see :func:`checksum_document`). Where they
go is ``KAIZEN_ADAPTER_STORE``:

* unset (the default): the adapter stays in the directory the trainer wrote it to and is
  recorded as ``file:///...`` (one host, or a filesystem every host mounts: today's behaviour);
* ``file:///some/dir``: copied to ``/some/dir/<name>/`` (a shared mount);
* ``s3://bucket/prefix``: uploaded to ``prefix/<name>/`` of any S3-compatible store, through
  boto3 with the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ...) and ``KAIZEN_ADAPTER_STORE_ENDPOINT_URL``
  for a store that is not AWS.

A copy is written file by file, its checksum document (:data:`CHECKSUMS`) last: a version whose
document is there is complete. The trainer registers a version only after its upload finished,
so a replica never sees a URL whose files are still on their way.

A replica fetches a version it has not got into its local cache (:class:`AdapterCache`),
checks the document against the registry's digest and every file against the document, and
only then renames the download into place; the caller then runs the engine's own adapter checks
(:func:`server.engine.lora.check_adapter`) before loading it. A missing or corrupt object
raises :class:`ArtifactCorruptError` (refused, like a corrupt directory); a store that does not
answer raises :class:`ArtifactUnavailableError` (try again at the next poll). This module does
not import the engine: the checks that need the engine are the caller's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

CHECKSUMS = "kaizen-checksums.json"
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An adapter's artefact could not be published or fetched."""


class ArtifactCorruptError(ArtifactError):
    """The object is missing, incomplete or does not match its checksum: refuse the version."""


class ArtifactUnavailableError(ArtifactError):
    """The store did not answer (or refused our credentials): try again later."""


@dataclass(frozen=True)
class Published:
    """Where a published version lives and the digest of its checksum document."""

    uri: str
    sha256: str


# --- checksums


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != CHECKSUMS:
            yield path


def checksum_document(adapter_dir: Path) -> dict[str, Any]:
    """Every file of ``adapter_dir`` (its own :data:`CHECKSUMS` excepted) with size and SHA-256,
    in a fixed order."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ArtifactCorruptError(f"{adapter_dir} is not a directory")
    files = [
        {
            "path": path.relative_to(adapter_dir).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": _file_sha256(path),
        }
        for path in _walk(adapter_dir)
    ]
    if not files:
        raise ArtifactCorruptError(f"{adapter_dir} holds no files")
    return {"version": 1, "files": files}


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def document_sha256(document: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(document)).hexdigest()


def _parse_document(raw: bytes, expected_sha256: str | None, where: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
        files = document["files"]
        for entry in files:
            _safe_relative(entry["path"])
            if not isinstance(entry["bytes"], int) or not isinstance(entry["sha256"], str):
                raise TypeError(f"bad entry {entry!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactCorruptError(f"the checksum document at {where} is malformed: {exc}") from exc
    got = document_sha256(document)
    if expected_sha256 is not None and got != expected_sha256:
        raise ArtifactCorruptError(
            f"the checksum document at {where} does not match the registry "
            f"(sha256 {got[:12]}, registered {expected_sha256[:12]})"
        )
    return document


def _safe_relative(path: str) -> PurePosixPath:
    """A file name from a checksum document: relative, no ``..`` (it becomes a local path)."""
    rel = PurePosixPath(path)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise ValueError(f"unsafe file name {path!r}")
    return rel


def verify_dir(adapter_dir: Path, expected_sha256: str | None) -> None:
    """Refuse a directory whose files are not the ones the registry recorded (the digest of
    their checksum document must be ``expected_sha256``; None: nothing to check against)."""
    if expected_sha256 is None:
        return
    got = document_sha256(checksum_document(adapter_dir))
    if got != expected_sha256:
        raise ArtifactCorruptError(
            f"the files at {adapter_dir} do not match their registered checksum "
            f"(sha256 {got[:12]}, registered {expected_sha256[:12]})"
        )


def _verify_against(adapter_dir: Path, document: dict[str, Any], where: str) -> None:
    listed = {e["path"]: e for e in document["files"]}
    present = {p.relative_to(adapter_dir).as_posix() for p in _walk(adapter_dir)}
    if present != set(listed):
        raise ArtifactCorruptError(
            f"the files fetched from {where} are not the ones its checksum document lists"
        )
    for rel, entry in listed.items():
        path = adapter_dir / rel
        if path.stat().st_size != int(entry["bytes"]) or _file_sha256(path) != entry["sha256"]:
            raise ArtifactCorruptError(f"{rel} fetched from {where} does not match its checksum")


# --- stores


class Store(Protocol):
    def put_dir(self, src: Path, name: str) -> str:
        """Copy ``src`` as version ``name``; returns its URL."""
        ...

    def get_dir(self, uri: str, dest: Path, expected_sha256: str | None) -> None:
        """Download the version at ``uri`` into the (new) directory ``dest``, verified."""
        ...


def _file_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ArtifactError(f"{uri}: a file:// URL names a local path (file:///dir)")
    return Path(unquote(parts.path))


class FileStore:
    """A directory (``file:///dir``), local or a mount every host shares."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put_dir(self, src: Path, name: str) -> str:
        document = checksum_document(src)
        dest = self.root / name
        if dest.exists():
            raise ArtifactError(f"{dest} exists: every version needs a new name")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        for entry in document["files"]:
            target = staging / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src) / entry["path"], target)
        (staging / CHECKSUMS).write_bytes(_canonical(document))
        staging.rename(dest)
        return dest.resolve().as_uri()

    def get_dir(self, uri: str, dest: Path, expected_sha256: str | None) -> None:
        src = _file_path(uri)
        marker = src / CHECKSUMS
        if not marker.is_file():
            raise ArtifactCorruptError(f"{uri} has no {CHECKSUMS} (missing or incomplete)")
        document = _parse_document(marker.read_bytes(), expected_sha256, uri)
        for entry in document["files"]:
            source = src / entry["path"]
            if not source.is_file():
                raise ArtifactCorruptError(f"{uri}: {entry['path']} is missing")
            target = dest / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        _verify_against(dest, document, uri)


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError


class S3Store:
    """``s3://bucket/prefix`` on any S3-compatible store, through boto3."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def _split(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            raise ArtifactError(f"{uri} is not in s3://{self.bucket}")
        return parts.path.strip("/")

    def _fail(self, exc: BaseException, what: str) -> ArtifactError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                return ArtifactCorruptError(f"{what} is missing from the store ({code})")
        return ArtifactUnavailableError(f"the adapter store did not serve {what}: {exc}")

    def put_dir(self, src: Path, name: str) -> str:
        document = checksum_document(src)
        base = self._key(name)
        try:
            for entry in document["files"]:
                self.client.upload_file(
                    str(Path(src) / entry["path"]), self.bucket, f"{base}/{entry['path']}"
                )
            # Last: a version whose checksum document is there is complete.
            self.client.put_object(
                Bucket=self.bucket, Key=f"{base}/{CHECKSUMS}", Body=_canonical(document)
            )
        except _s3_errors() as exc:
            raise ArtifactError(
                f"upload of {name} to s3://{self.bucket}/{base} failed: {exc}"
            ) from exc
        return f"s3://{self.bucket}/{base}"

    def get_dir(self, uri: str, dest: Path, expected_sha256: str | None) -> None:
        base = self._split(uri)
        try:
            raw = self.client.get_object(Bucket=self.bucket, Key=f"{base}/{CHECKSUMS}")[
                "Body"
            ].read()
        except _s3_errors() as exc:
            raise self._fail(exc, f"{uri}/{CHECKSUMS}") from exc
        document = _parse_document(raw, expected_sha256, uri)
        for entry in document["files"]:
            target = dest / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(self.bucket, f"{base}/{entry['path']}", str(target))
            except _s3_errors() as exc:
                raise self._fail(exc, f"{uri}/{entry['path']}") from exc
        _verify_against(dest, document, uri)


def open_store(url: str, *, endpoint_url: str | None = None) -> Store:
    """The store at ``url`` (``file:///dir`` or ``s3://bucket/prefix``)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FileStore(_file_path(url))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ArtifactError(f"{url}: an S3 store is s3://bucket[/prefix]")
        return S3Store(parts.netloc, parts.path, endpoint_url=endpoint_url)
    raise ArtifactError(f"unsupported adapter store {url!r}: use file:///dir or s3://bucket/prefix")


def _store_settings() -> tuple[str, str | None]:
    from server.config import get_settings

    settings = get_settings()
    return settings.adapter_store, settings.adapter_store_endpoint_url or None


def publish_adapter(
    adapter_dir: Path,
    *,
    name: str,
    store: str | None = None,
    endpoint_url: str | None = None,
) -> Published:
    """Put a finished adapter where every replica can fetch it, before it is registered.

    ``store`` (default ``KAIZEN_ADAPTER_STORE``): empty keeps the files where they are."""
    if store is None:
        store, endpoint_url = _store_settings()
    adapter_dir = Path(adapter_dir).resolve()
    if not store:
        sha = document_sha256(checksum_document(adapter_dir))
        return Published(uri=adapter_dir.as_uri(), sha256=sha)
    target = open_store(store, endpoint_url=endpoint_url)
    sha = document_sha256(checksum_document(adapter_dir))
    uri = target.put_dir(adapter_dir, name)
    log.info("event=adapter_published name=%s uri=%s sha256=%s", name, uri, sha[:12])
    return Published(uri=uri, sha256=sha)


# --- the replica's side


def is_local(uri: str | None) -> bool:
    return not uri or urlsplit(uri).scheme in ("", "file")


@dataclass
class AdapterCache:
    """A replica's local copies of versions that live in a remote store: ``root/<name>/``
    (names are never reused, so a name's copy never goes stale)."""

    root: Path
    endpoint_url: str | None = None

    def fetch(self, name: str, uri: str | None, sha256: str | None, path: str) -> Path:
        """A verified local directory for the version: ``path`` when it has no URL (registered
        before artefacts had one), the directory itself for a ``file://`` URL with no copy
        (verified in place), else this cache's copy, downloaded first if need be."""
        if not uri:
            return Path(path)
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            local = _file_path(uri) if parts.scheme else Path(uri)
            if not local.is_dir():
                raise ArtifactCorruptError(f"{uri} does not exist on this host")
            if (local / CHECKSUMS).is_file():  # a copy in a file:// store
                document = _parse_document((local / CHECKSUMS).read_bytes(), sha256, uri)
                _verify_against(local, document, uri)
            else:
                verify_dir(local, sha256)
            return local
        _safe_relative(name)
        dest = self.root / name
        if dest.is_dir():
            try:
                verify_dir(dest, sha256)
                return dest
            except ArtifactCorruptError:
                log.warning("event=adapter_cache_corrupt name=%s; fetching again", name)
                shutil.rmtree(dest, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            store = open_store(f"{parts.scheme}://{parts.netloc}", endpoint_url=self.endpoint_url)
            store.get_dir(uri, staging, sha256)
            os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("event=adapter_fetched name=%s uri=%s dir=%s", name, uri, dest)
        return dest

    def discard(self, name: str) -> None:
        """Drop the cached copy of a version no longer loaded (no-op if there is none)."""
        try:
            _safe_relative(name)
        except ValueError:
            return
        shutil.rmtree(self.root / name, ignore_errors=True)


# --- a trainer host that did not train the version it continues from


def restore_to_path(
    uri: str | None,
    sha256: str | None,
    path: str,
    *,
    root: Path,
    endpoint_url: str | None = None,
) -> bool:
    """Download a version from its store to the directory the registry records for it
    (``Adapter.path``) when that directory is missing here and lies under ``root`` (this
    host's rounds directory); True when it did. Verified like a replica's copy."""
    dest = Path(path)
    if dest.is_dir() or is_local(uri):
        return False
    assert uri is not None
    if not dest.resolve().is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{dest} is outside {root}: not restoring {uri} there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        parts = urlsplit(uri)
        store = open_store(f"{parts.scheme}://{parts.netloc}", endpoint_url=endpoint_url)
        store.get_dir(uri, staging, sha256)
        os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("event=adapter_restored uri=%s dir=%s", uri, dest)
    return True


def restore_round_parents(
    session: Any, *, root: Path, parent: str | None = None, endpoint_url: str | None = None
) -> list[str]:
    """Before a round on a trainer host that may not be the one that trained them: restore
    the versions a round continues from and the gate compares against (the active one, the
    named ``parent``, the parents of unfinished rounds) to their recorded paths. Returns the
    names restored."""
    from sqlalchemy import or_, select

    from server.store.models import Adapter, TrainingRound

    running = select(TrainingRound.parent_adapter_id).where(TrainingRound.status == "running")
    wanted = [Adapter.state == "active", Adapter.id.in_(running)]
    if parent is not None:
        wanted.append(Adapter.name == parent)
    restored = []
    for adapter in session.scalars(select(Adapter).where(or_(*wanted))):
        if restore_to_path(
            adapter.uri, adapter.artifact_sha256, adapter.path, root=root, endpoint_url=endpoint_url
        ):
            restored.append(adapter.name)
    return restored
