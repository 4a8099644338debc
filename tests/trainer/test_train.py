"""DPO + NLL training of a LoRA adapter on the tiny model (CPU, a few steps each): the adapter
changes and the base does not, the manifest is complete, packed and padded batches train alike,
a parent adapter is continued against itself, runs reproduce, a non-finite value stops the round
without saving, and an interrupted round resumes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.utils.tiny_model import build_random_lora, build_tiny_model
from trainer.config import TrainConfig
from trainer.train import KaizenDPOTrainer, NonFiniteGuard, Pair, TrainResult, train_adapter

PAIRS = [
    Pair(
        id=f"p{i}",
        prompt=f"def add_{i}(a, b):\n" + "    # add them\n" * (i % 4),
        chosen="    return a + b\n" * (1 + i % 3),
        rejected="    return a - b\n" * (1 + i % 2),
        source="ci",
    )
    for i in range(16)
]
TRL_METRICS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "num_tokens",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny model is no faster on two threads, and one thread does not stall when other
    processes hold the cores (OpenMP's spinning threads then slow each step tenfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "batch_size": 4,
        "max_steps": 3,
        "warmup_steps": 0,
        "learning_rate": 1e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 128,
        "gradient_checkpointing": False,
    }
    values.update(overrides)
    return TrainConfig(**values)


def _train(model_dir: Path, output_dir: Path, **kwargs: Any) -> TrainResult:
    config = kwargs.pop("config", None) or _config()
    return train_adapter(
        base_model_dir=model_dir,
        pairs=kwargs.pop("pairs", PAIRS),
        config=config,
        parent_adapter=kwargs.pop("parent_adapter", None),
        output_dir=output_dir,
        progress=False,
        **kwargs,
    )


def _weights(result: TrainResult) -> dict[str, torch.Tensor]:
    assert result.adapter_dir is not None, result.stopped_reason
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_training_saves_a_changed_adapter_and_a_complete_manifest(
    model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_before = load_file(model_dir / "model.safetensors")
    too_long = Pair("long", "# " + "padding words " * 200 + "\n", "pass\n", "fail\n", "ci")
    result = _train(model_dir, tmp_path, pairs=[*PAIRS, too_long])  # its prompt fills max_length

    assert result.stopped_reason is None and result.steps == 3
    assert result.adapter_dir == tmp_path / "adapter"
    assert not (tmp_path / "checkpoints").exists()  # removed once the adapter is saved
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {
        p.name for p in result.adapter_dir.iterdir()
    }
    weights = _weights(result)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # no base weights
    assert all(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)  # B starts at 0

    # PEFT loads it; the base weights under it are untouched and the adapter changes the output.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(result.adapter_dir))
        adapted = model(input_ids=ids).logits
    under = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert under.keys() == base_before.keys()
    assert all(torch.equal(under[k], base_before[k].float()) for k in base_before)
    assert not torch.allclose(plain, adapted)
    assert load_file(model_dir / "model.safetensors").keys() == base_before.keys()

    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["base_model"]["dir"] == str(model_dir.resolve())
    assert len(manifest["base_model"]["sha256"]) == 64
    assert manifest["base_model"]["weights"] == [
        {"name": "model.safetensors", "bytes": (model_dir / "model.safetensors").stat().st_size}
    ]
    assert manifest["parent_adapter"] is None and manifest["reference"] == "base model"
    assert manifest["pair_ids"] == [p.id for p in PAIRS] and manifest["dropped_pair_ids"] == [
        "long"
    ]
    assert manifest["config"]["nll_weight"] == 1.0 and manifest["config"]["packing"] is True
    assert manifest["lora"]["r"] == 8 and manifest["steps"] == 3
    assert {"torch", "transformers", "peft", "trl"} <= manifest["versions"].keys()
    assert manifest["duration_s"] > 0 and manifest["tokens_per_s"] > 0

    for name in TRL_METRICS:
        assert math.isfinite(result.metrics[name]), name
    assert result.metrics == manifest["metrics"]
    assert result.tokens_per_s > 0 and result.trained_pair_ids == [p.id for p in PAIRS]


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "separate"])
def test_packed_and_padded_batches_give_the_same_training(
    model_dir: Path, tmp_path: Path, share_prompt: bool
) -> None:
    packed = _train(
        model_dir, tmp_path / "packed", config=_config(packing=True, share_prompt=share_prompt)
    )
    padded = _train(model_dir, tmp_path / "padded", config=_config(packing=False))
    # Throughput counts the same tokens whatever the layout; sharing computes fewer of them.
    assert packed.log_history[2]["num_tokens"] == padded.log_history[2]["num_tokens"]
    for a, b in zip(packed.log_history[:3], padded.log_history[:3], strict=True):
        for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert math.isclose(a[name], b[name], rel_tol=1e-4, abs_tol=1e-5), (name, a, b)
    a, b = _weights(packed), _weights(padded)
    assert a.keys() == b.keys()
    # Adam divides by the gradient's running scale, so where a gradient is ~0 float rounding
    # (which differs between layouts) moves a weight by up to lr; an error in the layout moves
    # every weight. test_packing compares the gradients themselves tightly.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-4, rtol=1e-3)


def test_continuing_from_a_parent_uses_it_as_the_reference(model_dir: Path, tmp_path: Path) -> None:
    parent = build_random_lora(model_dir, tmp_path / "parent", rank=8)
    result = _train(model_dir, tmp_path / "round", parent_adapter=parent)

    # At the first step the policy is the parent and so is the reference: zero rewards. (With
    # the base as the reference, the parent's random LoRA would give non-zero rewards.)
    first = result.log_history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    before, after = load_file(parent / "adapter_model.safetensors"), _weights(result)
    assert before.keys() == after.keys()  # same LoRA, no "ref" copy saved
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.adapter_dir is not None and not (result.adapter_dir / "ref").exists()
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["parent_adapter"]["dir"] == str(parent.resolve())
    assert len(manifest["parent_adapter"]["sha256"]) == 64
    assert manifest["reference"] == "parent adapter"

    # A grandchild continues from the child's output (its manifest names the same base).
    child = _train(
        model_dir,
        tmp_path / "round2",
        parent_adapter=result.adapter_dir,
        config=_config(max_steps=1),
    )
    assert child.stopped_reason is None


def test_same_inputs_and_seed_give_the_same_adapter(model_dir: Path, tmp_path: Path) -> None:
    config = _config(gradient_accumulation=2)
    first = _weights(_train(model_dir, tmp_path / "a", config=config))
    second = _weights(_train(model_dir, tmp_path / "b", config=config))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = _weights(_train(model_dir, tmp_path / "c", config=_config(seed=1)))
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_non_finite_loss_stops_the_round_and_saves_nothing(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packing: bool
) -> None:
    original = KaizenDPOTrainer._compute_loss

    def nan_at_step_two(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(KaizenDPOTrainer, "_compute_loss", nan_at_step_two)
    result = _train(model_dir, tmp_path, config=_config(max_steps=5, save_steps=1, packing=packing))
    assert result.adapter_dir is None and not (tmp_path / "adapter").exists()
    assert result.stopped_reason == "non-finite gradient at step 2"
    assert result.steps == 2
    # Step 1 was checkpointed; the poisoned step 2 was not.
    names = {p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")}
    assert names == {"checkpoint-1"}


def test_a_huge_learning_rate_is_stopped(model_dir: Path, tmp_path: Path) -> None:
    config = _config(max_steps=20, learning_rate=1e12, max_grad_norm=0.0)
    result = _train(model_dir, tmp_path, config=config)
    assert result.adapter_dir is None
    assert result.stopped_reason is not None and "non-finite" in result.stopped_reason
    assert result.steps < 20


@pytest.mark.parametrize("with_parent", [False, True], ids=["fresh", "parent"])
def test_an_interrupted_round_resumes_from_its_last_checkpoint(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    with_parent: bool,
) -> None:
    # With a parent, the checkpoints also hold TRL's frozen "ref" adapter (see
    # KaizenDPOTrainer._load_from_checkpoint); gradient checkpointing on for coverage.
    parent = build_random_lora(model_dir, tmp_path / "parent", rank=8) if with_parent else None
    config = _config(max_steps=5, save_steps=2, gradient_checkpointing=with_parent)
    original = KaizenDPOTrainer.training_step

    def interrupted_after_step_three(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KaizenDPOTrainer, "training_step", interrupted_after_step_three)
        with pytest.raises(KeyboardInterrupt):
            _train(model_dir, tmp_path / "run", config=config, parent_adapter=parent)
    assert not (tmp_path / "run" / "adapter").exists()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()

    with caplog.at_level(logging.INFO, logger="trainer.train"):
        resumed = _train(model_dir, tmp_path / "run", config=config, parent_adapter=parent)
    assert "resume_from=" + str(tmp_path / "run" / "checkpoints" / "checkpoint-2") in caplog.text
    assert resumed.steps == 5
    assert [e["step"] for e in resumed.log_history if "loss" in e] == [1, 2, 3, 4, 5]
    straight = _train(model_dir, tmp_path / "straight", config=config, parent_adapter=parent)
    a, b = _weights(resumed), _weights(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("change", ["other_pairs", "resume_off"])
def test_checkpoints_of_other_inputs_or_without_resume_are_discarded(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    config = _config(max_steps=3, save_steps=1)
    original = KaizenDPOTrainer.training_step

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KaizenDPOTrainer, "training_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _train(model_dir, tmp_path, config=config)
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()

    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        if change == "other_pairs":
            result = _train(model_dir, tmp_path, config=config, pairs=PAIRS[:8])
        else:
            result = _train(model_dir, tmp_path, config=config, resume=False)
    reason = "other_inputs" if change == "other_pairs" else "resume_disabled"
    assert (
        f"event=checkpoints_discarded dir={tmp_path / 'checkpoints'} reason={reason}" in caplog.text
    )
    assert [e["step"] for e in result.log_history if "loss" in e] == [1, 2, 3]
    with pytest.raises(FileExistsError):
        _train(model_dir, tmp_path, config=config)  # adapters are never overwritten


def test_guard_checks_gradients_and_logs() -> None:
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.global_step = 4
    guard, control = NonFiniteGuard(), TrainerControl()
    layer = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    guard.on_pre_optimizer_step(None, state, control, model=layer)
    guard.on_log(None, state, control, logs={"loss": 0.7, "grad_norm": 1.0, "epoch": 1})
    assert not control.should_training_stop and guard.reason is None

    layer.weight.grad[0, 0] = float("inf")
    control.should_save = True
    guard.on_pre_optimizer_step(None, state, control, model=layer)
    assert control.should_training_stop and not control.should_save
    assert guard.reason == "non-finite gradient at step 5"
    assert layer.weight.grad is None  # the optimiser step leaves the weights alone

    guard = NonFiniteGuard()
    guard.on_log(None, state, TrainerControl(), logs={"loss": float("nan")})
    assert guard.reason == "non-finite loss=nan at step 4"


def test_config_refuses_values_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="multiple of gradient_accumulation"):
        TrainConfig(batch_size=6, gradient_accumulation=4)
    with pytest.raises(ValueError, match="beta must be positive"):
        TrainConfig(beta=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    assert TrainConfig(batch_size=16, gradient_accumulation=4).micro_batch_size == 4


def test_a_checkpoint_cut_short_by_a_kill_is_skipped(tmp_path: Path) -> None:
    """A kill during a save leaves a checkpoint folder without trainer_state.json (written
    last); resuming from it would fail, so the one before it is used and the stub removed."""
    from trainer.train import _last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert _last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    for folder in tmp_path.iterdir():
        (folder / "trainer_state.json").unlink()
    assert _last_complete_checkpoint(tmp_path) is None


def test_an_ide_sized_fim_prompt_is_trimmed_not_mangled(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIM prompt far over max_length trains as a well-formed FIM prompt of the lines nearest
    the cursor, with its completions whole (TRL's keep-start truncation would cut off the
    suffix, the ``<|fim_middle|>`` marker and the completions)."""
    from transformers import AutoTokenizer

    from server.engine.fim import FimFormat
    from trainer.packing import PackedPreferenceCollator

    prefix = "".join(f"def helper_{i}(x):\n    return x + {i}\n\n" for i in range(60))
    prefix += "def add(a, b):\n    "
    suffix = "\n\n" + "".join(f"print(helper_{i}(1))\n" for i in range(30))
    long_pair = Pair(
        "fim-long",
        FimFormat().build(prefix, suffix),
        "return a + b\n",
        "return a - b\n",
        "ci",
        prefix=prefix,
        suffix=suffix,
    )
    seen: list[dict[str, Any]] = []
    original = PackedPreferenceCollator.__call__

    def spy(self: PackedPreferenceCollator, examples: list[dict[str, Any]]) -> dict[str, Any]:
        seen.extend(examples)
        return original(self, examples)

    monkeypatch.setattr(PackedPreferenceCollator, "__call__", spy)
    config = _config(max_steps=1, batch_size=4, save_steps=1000)
    result = _train(model_dir, tmp_path, pairs=[long_pair, *PAIRS[:3]], config=config)
    assert "fim-long" in result.trained_pair_ids
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (example,) = [e for e in seen if "helper_" in tokenizer.decode(e["prompt_ids"])][:1]
    prompt = tokenizer.decode(example["prompt_ids"])
    assert prompt.startswith("<|fim_prefix|>") and prompt.endswith("<|fim_middle|>")
    before, after = prompt.removeprefix("<|fim_prefix|>").split("<|fim_suffix|>")
    after = after.removesuffix("<|fim_middle|>")
    # The lines nearest the cursor on both sides, whole lines only.
    assert prefix.endswith(before) and before.endswith("def add(a, b):\n    ")
    assert len(before) < len(prefix) and prefix[len(prefix) - len(before) - 1] == "\n"
    assert after and suffix.startswith(after) and after.endswith("\n")
    assert tokenizer.decode(example["chosen_ids"]).startswith("return a + b\n")
    total = len(example["prompt_ids"]) + max(
        len(example["chosen_ids"]), len(example["rejected_ids"])
    )
    assert total <= config.max_length
