"""What makes a LoRA adapter servable, checked before an engine is asked to load it: a PEFT
adapter directory, a rank within the engine's limit, readable weights, and the base model it
was trained on (its manifest's fingerprint must be the served base's)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"


class AdapterRejectedError(ValueError):
    """An adapter that cannot be served (missing, malformed, rank too large, other base)."""


def base_fingerprint(model_dir: Path) -> dict[str, Any]:
    """A cheap identity of a checkpoint: SHA-256 of ``config.json`` and of its weight files'
    names and sizes (hashing gigabytes of weights every round is not worth it)."""
    model_dir = Path(model_dir)
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    weights = [
        {"name": path.name, "bytes": path.stat().st_size}
        for path in sorted(model_dir.iterdir())
        if path.suffix in {".safetensors", ".bin"} or path.name.endswith(".index.json")
    ]
    if not weights:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    digest = hashlib.sha256(json.dumps([config_sha, weights]).encode()).hexdigest()
    return {"sha256": digest, "config_sha256": config_sha, "weights": weights}


def read_adapter_rank(path: Path) -> int:
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterRejectedError(f"{path} is not a PEFT LoRA adapter (no adapter_config.json).")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
        return int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterRejectedError(f"{config_file} is malformed: {exc}") from exc


def _check_safetensors(path: Path) -> None:
    """The header must parse and the file must be as long as the header says (a truncated or
    overwritten file fails here, before vLLM sees it)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if path.stat().st_size < 8 + size + end:
            raise ValueError("the file is shorter than its header says")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AdapterRejectedError(f"{path} is not a readable safetensors file: {exc}") from exc


def check_adapter(path: Path, *, max_rank: int, base_sha256: str | None = None) -> int:
    """Refuse an adapter the engine could not serve correctly; returns its rank.

    ``base_sha256``: the served base's :func:`base_fingerprint`; an adapter whose manifest
    names another base is refused (one without a manifest cannot be checked and passes)."""
    path = Path(path)
    rank = read_adapter_rank(path)  # also refuses a path that does not exist
    if rank > max_rank:
        raise AdapterRejectedError(
            f"the adapter at {path} has rank {rank}; the engine accepts at most {max_rank} "
            "(KAIZEN_MAX_LORA_RANK)."
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterRejectedError(f"{path} has no {WEIGHTS}.")
    _check_safetensors(weights)
    manifest = path / MANIFEST
    if base_sha256 is not None and manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())["base_model"]["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterRejectedError(f"{manifest} is malformed: {exc}") from exc
        if recorded != base_sha256:
            raise AdapterRejectedError(
                f"the adapter at {path} was trained on another base model (fingerprint "
                f"{recorded[:12]}, this server's base is {base_sha256[:12]})."
            )
    return rank
