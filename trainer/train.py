"""One training step of a round: DPO plus an NLL term on the chosen side (CodeLutra's dual loss),
with TRL's ``DPOTrainer`` on a LoRA adapter (PEFT).

TRL 1.16 expresses the dual loss as ``loss_type=["sigmoid", "sft"]`` with
``loss_weights=[1, nll_weight]``. With a ``peft_config`` TRL loads no second model: the
reference is the base model with the adapter disabled. When continuing from a parent adapter,
the parent is loaded as the trainable adapter, so the reference is still the base model (every
round is regularised towards the same anchor).

A round whose loss or gradient norm goes non-finite stops at once and saves nothing: the caller
keeps the active adapter (a pilot of this recipe went to NaN within 20 steps).

Packing sequences without padding is not wired in yet: TRL turns padding-free off for DPO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    beta: float = field(default=0.1, metadata={"help": "DPO temperature."})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the chosen-side NLL."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (-1: off)."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per optimiser step."})
    max_length: int = field(default=1024, metadata={"help": "Tokens of prompt plus completion."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the engine's limit applies)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and initialisation."})

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.batch_size < 1 or self.lora_r < 1:
            raise ValueError("batch_size and lora_r must be at least 1")


@dataclass
class TrainResult:
    adapter_dir: Path | None  # None when the round was stopped
    steps: int
    duration_s: float
    metrics: dict[str, float]
    stopped_reason: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def _non_finite_guard(state: dict[str, str | None]) -> Any:
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        """Stops training at the first non-finite loss or gradient norm, recording why."""

        def on_log(self, args, control_state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    state["reason"] = (
                        f"non-finite {key} ({value}) at step {control_state.global_step}"
                    )
                    control.should_training_stop = True
            return control

    return NonFiniteGuard()


def _fingerprint(model_dir: Path) -> str:
    """A cheap identity of a checkpoint: its config and the names and sizes of its files."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def train_adapter(
    *,
    base_model_dir: Path,
    pairs: Sequence[Pair],
    config: TrainConfig,
    output_dir: Path,
    parent_adapter: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on ``pairs``; saves ``output_dir/adapter`` and its manifest.

    Example::

        result = train_adapter(base_model_dir=Path("~/.kaizen/models/qwen2.5-coder-0.5b-instruct"),
                               pairs=pairs, config=TrainConfig(), output_dir=Path("rounds/1"))
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("no pairs to train on")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    peft_config = None
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(model, parent_adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    args = DPOConfig(
        output_dir=str(output_dir / "trainer"),
        beta=config.beta,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, config.nll_weight],
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="linear",
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
    )
    guard: dict[str, str | None] = {"reason": None}
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_non_finite_guard(guard)],
    )
    trainer.train()
    history = list(trainer.state.log_history)
    metrics = {
        k: float(v)
        for entry in history
        for k, v in entry.items()
        if isinstance(v, (int, float)) and k != "epoch"
    }
    duration = time.perf_counter() - started
    if guard["reason"] is not None:
        log.error("event=round_stopped reason=%s", guard["reason"])
        return TrainResult(
            adapter_dir=None,
            steps=trainer.state.global_step,
            duration_s=duration,
            metrics=metrics,
            stopped_reason=guard["reason"],
            log_history=history,
        )
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    manifest = {
        "base_model": str(base_model_dir),
        "base_model_fingerprint": _fingerprint(base_model_dir),
        "parent_adapter": str(parent_adapter) if parent_adapter else None,
        "pair_ids": [p.id for p in pairs],
        "config": asdict(config),
        "metrics": metrics,
        "steps": trainer.state.global_step,
        "duration_s": duration,
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info(
        "event=adapter_trained dir=%s steps=%d duration_s=%.1f",
        adapter_dir,
        trainer.state.global_step,
        duration,
    )
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        duration_s=duration,
        metrics=metrics,
        log_history=history,
    )
