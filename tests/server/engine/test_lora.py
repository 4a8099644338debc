"""The checks an adapter passes before any engine is asked to load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.engine.lora import AdapterRejectedError, base_fingerprint, check_adapter
from tests.utils.adapters import BASE_SHA, make_adapter_dir


def test_a_well_formed_adapter_passes_and_reports_its_rank(tmp_path: Path) -> None:
    path = make_adapter_dir(tmp_path / "a", rank=8)
    assert check_adapter(path, max_rank=16, base_sha256=BASE_SHA) == 8


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "adapter_config.json").unlink(), "not a PEFT LoRA adapter"),
        (lambda p: (p / "adapter_config.json").write_text("{"), "malformed"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "has no adapter_model"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(
                (p / "adapter_model.safetensors").read_bytes()[:-8]
            ),
            "shorter than its header",
        ),
        (
            lambda p: (p / "manifest.json").write_text(
                json.dumps({"base_model": {"sha256": "c" * 64}})
            ),
            "another base model",
        ),
    ],
    ids=["no-config", "bad-config", "no-weights", "truncated", "other-base"],
)
def test_a_damaged_adapter_is_refused_with_the_reason(
    tmp_path: Path, damage: object, message: str
) -> None:
    path = make_adapter_dir(tmp_path / "a")
    damage(path)  # type: ignore[operator]
    with pytest.raises(AdapterRejectedError, match=message):
        check_adapter(path, max_rank=16, base_sha256=BASE_SHA)


def test_a_rank_over_the_engine_limit_is_refused(tmp_path: Path) -> None:
    path = make_adapter_dir(tmp_path / "a", rank=32)
    with pytest.raises(AdapterRejectedError, match="KAIZEN_MAX_LORA_RANK"):
        check_adapter(path, max_rank=16)


def test_the_base_fingerprint_changes_with_the_config_and_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = base_fingerprint(tmp_path)["sha256"]
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    second = base_fingerprint(tmp_path)["sha256"]
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert len({first, second, base_fingerprint(tmp_path)["sha256"]}) == 3
