"""One training step of a round: DPO plus an NLL term on the chosen side (CodeLutra's dual loss)
on a LoRA adapter, with TRL's ``DPOTrainer`` (``loss_type=["sigmoid", "sft"]``).

* A fresh round wraps the base model with a ``LoraConfig``; TRL loads no second model and the
  reference is the base with the adapter disabled.
* Continuing from a parent adapter loads it as the trainable adapter; TRL then copies it into a
  frozen ``ref`` adapter, so the reference is the parent's policy: each round is regularised
  towards the previous round's model, as CodeLutra iterates.
* Batches group pairs of similar length (``config.group_by_length``). With ``config.packing``
  (the default) they are packed without padding (:mod:`trainer.packing`), each pair's prompt
  computed once for both sides where the attention allows (``config.share_prompt``), and
  :class:`KaizenDPOTrainer` computes the same loss and metrics as TRL from the packed rows;
  otherwise TRL pads them.
* Pairs are fitted to ``config.max_length`` first (:mod:`trainer.budget`: a FIM prompt is trimmed
  on both sides and rebuilt, completions are kept whole), so TRL's own truncation, which keeps
  a sequence's start and so cuts off the suffix and ``<|fim_middle|>``, never applies.
* A non-finite gradient or logged value stops the round at once and saves nothing: the caller
  keeps the active adapter. Checkpoints every ``save_steps`` let an interrupted round resume.

Importing this module loads TRL (a few seconds): import it where rounds run, not in the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from server.engine.lora import base_fingerprint
from trainer.budget import fit_pairs
from trainer.config import TrainConfig
from trainer.packing import (
    LengthBucketSampler,
    PackedBatch,
    PackedPreferenceCollator,
    attention_weight,
    dpo_nll_loss,
    sequence_logps,
    supports_shared_prompts,
    target_counts,
    token_logps,
)
from trainer.pairs import Pair

__all__ = [
    "AdapterTrainerMixin",
    "KaizenDPOTrainer",
    "NonFiniteGuard",
    "Pair",
    "TrainConfig",
    "TrainResult",
    "adapter_manifest",
    "base_fingerprint",
    "train_adapter",
]

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
_RUN_KEY = "run.json"  # in the checkpoints folder: which inputs its checkpoints belong to


@dataclass
class TrainResult:
    adapter_dir: Path | None  # None when the round was stopped
    steps: int
    duration_s: float
    # Prompt and completion tokens of both sides per second of training, a shared prompt counted
    # for each side: the same count whatever the batch layout, so layouts compare by it.
    tokens_per_s: float
    metrics: dict[str, float]  # TRL's names: loss, rewards/chosen, logps/rejected, ...
    trained_pair_ids: list[str]
    stopped_reason: str | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    method: str = "dpo"  # TrainConfig.method: "dpo" (trained_pair_ids) or "grpo" (task ids)
    trained_task_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """As JSON (the adapter's path a string): what a round's ``trained.json`` and a launched
        training's result file hold."""
        data = asdict(self)
        data["adapter_dir"] = None if self.adapter_dir is None else str(self.adapter_dir)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        """Back from :meth:`to_json` (fields it does not know are left out)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("adapter_dir") is not None:
            values["adapter_dir"] = Path(values["adapter_dir"])
        return cls(**values)


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first non-finite gradient or logged value and records why.

    Gradients are checked before every optimiser step (after clipping, which turns a NaN norm
    into NaN everywhere) and dropped so that the step leaves the weights alone; logged values
    (loss, grad_norm, rewards, log-probs) at every log. No checkpoint is saved once tripped.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def _trip(self, control: Any, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.error("event=train_non_finite reason=%r", reason)
        control.should_training_stop = True
        control.should_save = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        grads = [p for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not bool(torch.stack([torch.isfinite(p.grad).all() for p in grads]).all()):
            for p in grads:
                p.grad = None  # the optimiser skips parameters without a gradient
            self._trip(control, f"non-finite gradient at step {state.global_step + 1}")
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.reason is not None:
            control.should_save = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        bad = {
            key: value
            for key, value in (logs or {}).items()
            if isinstance(value, (int, float)) and not math.isfinite(value)
        }
        if bad:
            found = " ".join(f"{key}={value}" for key, value in bad.items())
            self._trip(control, f"non-finite {found} at step {state.global_step}")
        return control


class _LogMetrics(TrainerCallback):
    """Every log as one ``key=value`` line."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        values = " ".join(
            f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in (logs or {}).items()
        )
        log.info("event=train_log step=%d %s", state.global_step, values)


class AdapterTrainerMixin:
    """What every Kaizen trainer of a LoRA adapter (DPO here, GRPO in :mod:`trainer.grpo`) does
    differently from TRL's: no telemetry, no model card, and a resumed checkpoint's trained
    adapter loaded back even when TRL's frozen ``ref`` copy sits beside it."""

    def _send_telemetry(self) -> None:
        return  # an on-prem assistant reports to nobody

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        return  # checkpoints need no README

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        # When the checkpoint also holds TRL's frozen "ref" adapter (a parent was continued), it
        # sits in a sub-folder, and transformers 5.19 then loads only the sub-folders: the trained
        # "default" adapter, saved at the checkpoint's root, would restart from the parent.
        weights = load_file(Path(resume_from_checkpoint) / "adapter_model.safetensors")
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        result = set_peft_model_state_dict(target, weights, adapter_name="default")
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not fit the adapter")


class KaizenDPOTrainer(AdapterTrainerMixin, DPOTrainer):
    """``DPOTrainer`` with length-bucketed batches, optional packed batches, and no telemetry.

    With ``packing`` the collator is :class:`~trainer.packing.PackedPreferenceCollator` and the
    loss is computed here from packed rows (policy, then reference under ``use_adapter`` as TRL
    does), with the same objective and metric names as TRL's padded path.
    """

    def __init__(
        self,
        *args: Any,
        packing: bool,
        nll_weight: float,
        group_by_length: bool = True,
        **kwargs: Any,
    ) -> None:
        self.packing = packing
        self.nll_weight = nll_weight
        self.group_by_length = group_by_length
        self.data_tokens = 0  # prompt and completion tokens of both sides: tokens_per_s
        self.real_tokens = 0  # tokens the forward pass computed, less padding
        self.slot_tokens = 0  # tokens the forward pass computed, padding included
        super().__init__(*args, **kwargs)
        if self.ref_model is not None or not isinstance(self.model, PeftModel):
            raise TypeError("KaizenDPOTrainer trains a PEFT adapter against an adapter reference")
        if packing and self.loss_types != ["sigmoid", "sft"]:
            raise ValueError("packed batches implement loss_type=['sigmoid', 'sft'] only")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.packing and "weight" not in self._signature_columns:
            # Kept through TRL's column pruning: the packed collator hands it to the loss.
            self._signature_columns = [*self._signature_columns, "weight"]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)  # TRL's shuffled order
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [
            len(prompt) + max(len(chosen), len(rejected))
            for prompt, chosen, rejected in zip(
                dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
            )
        ]
        return LengthBucketSampler(
            lengths, self.args.per_device_train_batch_size, seed=self.args.seed
        )

    def _count_tokens(self, data: int, real: int, slots: int) -> None:
        if self.model.training:
            self.data_tokens += data
            self.real_tokens += real
            self.slot_tokens += slots
            mode = "train"
        else:
            mode = "eval"
        self._metrics[mode]["padding_ratio"].append(1.0 - real / max(slots, 1))

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self.packing:
            mask = inputs["attention_mask"]
            self._count_tokens(int(mask.sum()), int(mask.sum()), mask.numel())
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:
            raise NotImplementedError("packed batches give no logits; evaluate with packing=False")
        batch = PackedBatch.from_inputs(inputs)
        policy = sequence_logps(token_logps(model, batch, fused_lm_head=True), batch)
        unwrapped = self.accelerator.unwrap_model(self.model)
        reference_adapter = "ref" if "ref" in unwrapped.peft_config else None  # None: the base
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            use_adapter(unwrapped, adapter_name=reference_adapter),
        ):
            reference = sequence_logps(token_logps(model, batch, fused_lm_head=True), batch)
        n = batch.num_pairs
        out = dpo_nll_loss(
            policy[:n],
            policy[n:],
            reference[:n],
            reference[n:],
            chosen_tokens=target_counts(batch)[:n],
            beta=self.beta,
            nll_weight=self.nll_weight,
            weights=inputs.get("pair_weights"),
        )
        self._count_tokens(batch.data_tokens, batch.num_tokens, batch.input_ids.numel())
        mode = "train" if self.model.training else "eval"

        def mean(values: torch.Tensor) -> float:
            # Over every process's pairs, as TRL's metrics (one process: these pairs).
            return self.accelerator.gather(values.detach().float().reshape(-1)).mean().item()

        if mode == "train":
            tokens = torch.tensor([batch.data_tokens], device=batch.input_ids.device)
            self._total_train_tokens += int(self.accelerator.gather(tokens).sum().item())
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["nll"].append(mean(out.nll))
        metrics["rewards/chosen"].append(mean(out.chosen_rewards))
        metrics["rewards/rejected"].append(mean(out.rejected_rewards))
        metrics["rewards/accuracies"].append(mean(out.chosen_rewards > out.rejected_rewards))
        metrics["rewards/margins"].append(mean(out.chosen_rewards - out.rejected_rewards))
        metrics["logps/chosen"].append(mean(policy[:n]))
        metrics["logps/rejected"].append(mean(policy[n:]))
        return out.loss


def train_adapter(
    *,
    base_model_dir: Path,
    pairs: Sequence[Pair],
    config: TrainConfig,
    parent_adapter: Path | None = None,
    output_dir: Path,
    progress: bool = True,
    resume: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``pairs``; on success ``output_dir/adapter`` holds it (PEFT format,
    as vLLM loads it) with ``manifest.json``, and the checkpoints are removed.

    ``resume=True`` continues from the last checkpoint in ``output_dir/checkpoints`` when it was
    written for the same inputs (base, parent, pairs, config); other checkpoints are discarded. A
    round stopped by a non-finite value returns ``adapter_dir=None`` and ``stopped_reason``.
    ``extra_manifest`` adds fields to the manifest (a round adds the ids of its records).

    Example::

        result = train_adapter(
            base_model_dir=Path("~/.kaizen/models/qwen2.5-coder-0.5b-instruct").expanduser(),
            pairs=[Pair("p1", "def add(a, b):\\n", "    return a + b\\n", "    return a\\n", "ci")],
            config=TrainConfig(),
            parent_adapter=None,
            output_dir=Path("rounds/1"),
        )
        assert result.stopped_reason is None, result.stopped_reason
    """
    base_model_dir, output_dir = Path(base_model_dir), Path(output_dir)
    parent_adapter = Path(parent_adapter) if parent_adapter is not None else None
    if not pairs:
        raise ValueError("no pairs to train on")
    if len({pair.id for pair in pairs}) != len(pairs):
        raise ValueError("pair ids must be unique")
    adapter_dir = output_dir / ADAPTER_DIR
    if adapter_dir.exists():
        raise FileExistsError(
            f"{adapter_dir} exists; adapter directories are immutable (the engine may re-read "
            "them), so train into a new output_dir"
        )
    started = time.perf_counter()
    base = base_fingerprint(base_model_dir)
    parent = _parent_fingerprint(parent_adapter, base["sha256"])
    run_key = _run_key(config, base["sha256"], parent, pairs)
    checkpoints = output_dir / CHECKPOINTS_DIR
    # Built first: under `accelerate launch` (trainer.launch) this joins the process group, and
    # only the main process may then clear or create the checkpoints folder.
    args = _dpo_config(config, checkpoints, progress)
    with args.main_process_first(local=False, desc="checkpoints"):
        if args.process_index == 0:
            resume_from = _prepare_checkpoints(checkpoints, run_key, resume)
        else:  # what the main process kept
            resume_from = get_last_checkpoint(str(checkpoints)) if resume else None

    with _progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        fitted = fit_pairs(pairs, tokenizer, config.max_length)
        if fitted.funnel["trimmed"] or len(fitted.pairs) < len(pairs):
            log.info(
                "event=pairs_fitted max_length=%d trimmed=%d too_long=%s",
                config.max_length,
                fitted.funnel["trimmed"],
                fitted.funnel["too_long"],
            )
        if not fitted.pairs:
            raise ValueError(
                f"no pair fits max_length={config.max_length} (a completion alone is longer, "
                "or a chat prompt); raise max_length"
            )
        if not config.packing and any(p.weight != 1.0 for p in fitted.pairs):
            raise ValueError(
                "weighted pairs (judge pairs) need packed batches, where the loss applies the "
                "weight; TRL's padded path would train them as execution pairs: set packing=True"
            )
        model, peft_config = _load_model(base_model_dir, parent_adapter, config)
        dataset = Dataset.from_list(
            [
                {
                    "id": p.id,
                    "prompt": p.prompt,
                    "chosen": p.chosen,
                    "rejected": p.rejected,
                    "weight": p.weight,  # judge pairs below 1 (packed batches apply it)
                }
                for p in fitted.pairs
            ]
        )
        share_prompt = config.packing and config.share_prompt
        if share_prompt and not supports_shared_prompts(model):
            log.warning(
                "event=share_prompt_off attention=%s reason=needs_sdpa_or_eager",
                model.config._attn_implementation,
            )
            share_prompt = False
        collator = (
            PackedPreferenceCollator(
                pad_token_id=tokenizer.pad_token_id,
                max_length=config.max_length,
                attention_weight=attention_weight(model),
                share_prompt=share_prompt,
            )
            if config.packing
            else None
        )
        guard = NonFiniteGuard()
        trainer = KaizenDPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=collator,
            peft_config=peft_config,
            callbacks=[guard, _LogMetrics()],
            packing=config.packing,
            nll_weight=config.nll_weight,
            group_by_length=config.group_by_length,
        )
        trainer.remove_callback(PrinterCallback)  # it prints; _LogMetrics logs
        trained_ids = [str(i) for i in trainer.train_dataset["id"]]
        if len(trained_ids) < len(pairs):
            log.warning(
                "event=pairs_dropped count=%d reason=prompt_fills_max_length max_length=%d",
                len(pairs) - len(trained_ids),
                config.max_length,
            )
        if not trained_ids:
            raise ValueError(f"every prompt fills max_length={config.max_length}; raise it")
        log.info(
            "event=train_start pairs=%d packing=%s share_prompt=%s parent=%s resume_from=%s "
            "device=%s",
            len(trained_ids),
            config.packing,
            share_prompt,
            parent_adapter,
            resume_from,
            trainer.args.device,
        )
        output = trainer.train(resume_from_checkpoint=resume_from)

    history = list(trainer.state.log_history)
    runtime = float(output.metrics.get("train_runtime", 0.0)) or 1e-9
    if args.world_size > 1:  # each process counted its own batches: the totals of all of them
        counts = torch.tensor(
            [trainer.data_tokens, trainer.real_tokens, trainer.slot_tokens],
            device=trainer.accelerator.device,
        )
        summed = trainer.accelerator.reduce(counts, reduction="sum").tolist()
        trainer.data_tokens, trainer.real_tokens, trainer.slot_tokens = map(int, summed)
    tokens_per_s = trainer.data_tokens / runtime
    metrics = _final_metrics(history)
    metrics["tokens_per_second"] = tokens_per_s
    metrics["padding_ratio"] = 1.0 - trainer.real_tokens / max(trainer.slot_tokens, 1)
    # Token slots the forward passes ran per data token: above 1 from padding, below 1 where
    # shared prompts were computed once for both sides.
    metrics["computed_per_data_token"] = trainer.slot_tokens / max(trainer.data_tokens, 1)
    steps = trainer.state.global_step
    duration = time.perf_counter() - started
    result = TrainResult(
        adapter_dir=None,
        steps=steps,
        duration_s=duration,
        tokens_per_s=tokens_per_s,
        metrics=metrics,
        trained_pair_ids=trained_ids,
        stopped_reason=guard.reason,
        log_history=history,
    )
    if guard.reason is not None:
        log.error("event=round_stopped steps=%d reason=%r", steps, guard.reason)
        return result

    policy = trainer.accelerator.unwrap_model(trainer.model)
    manifest = adapter_manifest(
        base_model_dir=base_model_dir,
        base=base,
        parent=parent,
        config=config,
        policy=policy,
        result=result,
        reference="parent adapter" if parent_adapter else "base model",
        pair_ids=trained_ids,
        dropped_pair_ids=sorted({p.id for p in pairs} - set(trained_ids)),
        **(extra_manifest or {}),
    )
    if args.process_index == 0:  # the other processes of a launch hold the same weights
        _save_adapter(policy, adapter_dir, manifest)
        shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    result.adapter_dir = adapter_dir
    log.info(
        "event=adapter_trained dir=%s steps=%d duration_s=%.1f tokens_per_s=%.0f loss=%s",
        adapter_dir,
        steps,
        duration,
        tokens_per_s,
        metrics.get("loss"),
    )
    return result


def adapter_manifest(
    *,
    base_model_dir: Path,
    base: dict[str, Any],
    parent: dict[str, Any] | None,
    config: TrainConfig,
    policy: Any,
    result: TrainResult,
    reference: str,
    **extra: Any,
) -> dict[str, Any]:
    """The ``manifest.json`` of a trained adapter, whatever the method: the registry, the gate
    and the canary read the same fields from a DPO and a GRPO adapter. ``extra`` adds the
    method's own (a DPO round's pair ids, a GRPO round's task ids and reward rule)."""
    return {
        "method": result.method,
        "base_model": {"dir": str(Path(base_model_dir).resolve()), **base},
        "parent_adapter": parent,
        "config": asdict(config),
        "lora": _lora_summary(policy.peft_config["default"]),
        "reference": reference,
        "metrics": result.metrics,
        "steps": result.steps,
        "duration_s": round(result.duration_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "versions": _versions(),
        **extra,
    }


# -- helpers ----------------------------------------------------------------------------------


def _parent_fingerprint(parent: Path | None, base_sha256: str) -> dict[str, Any] | None:
    """The parent's path and weights hash; refuses a parent trained on another base."""
    if parent is None:
        return None
    weights = parent / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: parent_adapter must be a PEFT adapter dir")
    manifest = parent / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())["base_model"]["sha256"]
        if recorded != base_sha256:
            raise ValueError(f"parent adapter {parent} was trained on another base model")
    return {
        "dir": str(parent.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def _run_key(
    config: TrainConfig, base_sha256: str, parent: dict[str, Any] | None, pairs: Sequence[Pair]
) -> str:
    payload = {
        "config": asdict(config),
        "base": base_sha256,
        "parent": parent and parent["sha256"],
        "pairs": [asdict(pair) for pair in pairs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare_checkpoints(checkpoints: Path, run_key: str, resume: bool) -> str | None:
    """The checkpoint to resume from, if any; discards checkpoints of other inputs."""
    if checkpoints.is_dir():
        key_file = checkpoints / _RUN_KEY
        same_run = key_file.is_file() and json.loads(key_file.read_text()).get("key") == run_key
        last = _last_complete_checkpoint(checkpoints) if same_run else None
        if resume and last is not None:
            return last
        if any(checkpoints.iterdir()):
            reason = "resume_disabled" if same_run else "other_inputs"
            log.warning("event=checkpoints_discarded dir=%s reason=%s", checkpoints, reason)
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    (checkpoints / _RUN_KEY).write_text(json.dumps({"key": run_key}))
    return None


def _last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint that was written to the end. transformers writes a checkpoint's
    ``trainer_state.json`` last, so a folder without one is what a kill mid-save left behind:
    it is removed, and the one before it is used."""
    while (last := get_last_checkpoint(str(checkpoints))) is not None:
        if (Path(last) / "trainer_state.json").is_file():
            return last
        log.warning("event=checkpoint_incomplete dir=%s action=removed", last)
        shutil.rmtree(last)
    return None


def _load_model(
    base_model_dir: Path, parent_adapter: Path | None, config: TrainConfig
) -> tuple[Any, LoraConfig | None]:
    """The base in fp32 (bf16 is autocast) and either a LoraConfig for TRL or the parent adapter."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if parent_adapter is None:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return model, lora
    model = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    loaded = model.peft_config["default"]
    if (loaded.r, loaded.lora_alpha) != (config.lora_r, config.lora_alpha):
        log.warning(
            "event=lora_shape_from_parent r=%d alpha=%s config_r=%d config_alpha=%d",
            loaded.r,
            loaded.lora_alpha,
            config.lora_r,
            config.lora_alpha,
        )
    return model, None


def _dpo_config(config: TrainConfig, checkpoints: Path, progress: bool) -> DPOConfig:
    on_gpu = torch.cuda.is_available()
    # `batch_size` pairs per optimiser step whatever the number of processes: under a launch of
    # N (WORLD_SIZE, trainer.launch) each takes 1/N of the micro-batches or of each micro-batch.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accumulation = config.micro_batch_size, config.gradient_accumulation
    if world > 1:
        if accumulation % world == 0:
            accumulation //= world
        elif micro % world == 0:
            micro //= world
        else:
            raise ValueError(
                f"batch_size={config.batch_size} with gradient_accumulation="
                f"{config.gradient_accumulation} cannot be split over {world} processes; make "
                f"gradient_accumulation or batch_size / gradient_accumulation a multiple of {world}"
            )
    bf16 = config.bf16 if config.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    return DPOConfig(
        output_dir=str(checkpoints),
        beta=config.beta,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, config.nll_weight],
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=config.max_grad_norm,
        max_length=config.max_length,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        # TRL zeroes all dropout (policy and reference log-probs must agree); keep LoRA's if set.
        disable_dropout=config.lora_dropout == 0,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # otherwise a NaN loss is logged as the running average
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=not on_gpu,
        # Under DDP (trainer.launch): every trainable (LoRA) weight is used in every forward.
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=on_gpu,
    )


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged training step's metrics plus the run summary (train_loss, train_runtime)."""
    metrics: dict[str, float] = {}
    steps = [entry for entry in history if "loss" in entry]
    for entry in steps[-1:] + [entry for entry in history if "train_runtime" in entry]:
        metrics.update(
            {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
        )
    return metrics


def _lora_summary(lora: Any) -> dict[str, Any]:
    targets = lora.target_modules
    return {
        "r": lora.r,
        "alpha": lora.lora_alpha,
        "dropout": lora.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
    }


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
    }


def _save_adapter(model: Any, adapter_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the trained adapter (not TRL's frozen ``ref`` copy) and its manifest, then move the
    folder into place in one rename, so a reader never sees half an adapter."""
    staging = adapter_dir.with_name(f".{adapter_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), selected_adapters=["default"])
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    staging.rename(adapter_dir)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence datasets' and transformers' own bars when ``progress`` is off (restored after)."""
    was_datasets = datasets.is_progress_bar_enabled()
    was_transformers = transformers.utils.logging.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_datasets:
            datasets.enable_progress_bars()
        if was_transformers:
            transformers.utils.logging.enable_progress_bar()
