"""DPO + NLL training of a LoRA adapter on the tiny model: the adapter changes, the base does not,
the manifest is complete, and a non-finite loss stops the round without saving anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.utils.tiny_model import build_tiny_model
from trainer.pairs import Pair
from trainer.train import TrainConfig, _non_finite_guard, train_adapter

PAIRS = [
    Pair(
        id=f"p{i}",
        prompt=f"def add{i}(a, b):\n    ",
        chosen="return a + b\n",
        rejected="return a - b\n",
        source="ci",
    )
    for i in range(8)
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "batch_size": 4,
        "max_steps": 3,
        "warmup_steps": 0,
        "learning_rate": 1e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 64,
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_training_saves_a_changed_adapter_and_a_manifest(model_dir: Path, tmp_path: Path) -> None:
    before = load_file(model_dir / "model.safetensors")
    result = train_adapter(
        base_model_dir=model_dir, pairs=PAIRS, config=_config(), output_dir=tmp_path, progress=False
    )
    assert result.stopped_reason is None and result.steps == 3
    assert result.adapter_dir is not None
    assert (result.adapter_dir / "adapter_config.json").is_file()
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # PEFT initialises B to zero
    after = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["pair_ids"] == [p.id for p in PAIRS] and manifest["steps"] == 3
    assert manifest["config"]["nll_weight"] == 1.0 and manifest["base_model_fingerprint"]
    assert math.isfinite(result.metrics["loss"])
    assert any("rewards/chosen" in k for k in result.metrics)


def test_training_continues_from_a_parent_adapter(model_dir: Path, tmp_path: Path) -> None:
    first = train_adapter(
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(max_steps=1),
        output_dir=tmp_path / "r1",
        progress=False,
    )
    assert first.adapter_dir is not None
    second = train_adapter(
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(max_steps=1),
        output_dir=tmp_path / "r2",
        parent_adapter=first.adapter_dir,
        progress=False,
    )
    assert second.adapter_dir is not None
    a = load_file(first.adapter_dir / "adapter_model.safetensors")
    b = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((second.adapter_dir / "manifest.json").read_text())
    assert manifest["parent_adapter"] == str(first.adapter_dir)


def test_non_finite_loss_stops_the_round_and_saves_nothing(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trl import DPOTrainer

    original = DPOTrainer.compute_loss

    def nan_loss(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss = original(self, *args, **kwargs)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return loss * float("nan")

    monkeypatch.setattr(DPOTrainer, "compute_loss", nan_loss)
    result = train_adapter(
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(max_steps=5),
        output_dir=tmp_path,
        progress=False,
    )
    assert result.adapter_dir is None and not (tmp_path / "adapter").exists()
    assert result.stopped_reason is not None and "non-finite" in result.stopped_reason
    assert result.steps < 5


def test_guard_ignores_finite_logs() -> None:
    state: dict[str, str | None] = {"reason": None}

    class Control:
        should_training_stop = False

    class TrainerState:
        global_step = 1

    guard = _non_finite_guard(state)
    control = guard.on_log(None, TrainerState(), Control(), logs={"loss": 0.7, "grad_norm": 1.0})
    assert not control.should_training_stop and state["reason"] is None
