"""Outcome-gated GRPO on a LoRA adapter (Posterior-GRPO), with TRL's ``GRPOTrainer``.

For each self-contained task (:mod:`trainer.tasks`: a FIM prompt and its asserts) the policy
samples a group of completions as the server would prompt it; each is cut where the server would
stop it, run against the task's test in the :class:`~trainer.sandbox.Sandbox` (the sealed
outcome), checked for format, and, where the rule says its score can count, shown to the judge
(:mod:`trainer.judge`). :class:`~trainer.rewards.RewardRule` turns those into one reward:

    R = format + outcome + 1[outcome] * process        (``config.grpo_gated``, the default)

The adapter, the checkpoints, the non-finite guard and the manifest are the DPO path's
(:mod:`trainer.train`): a GRPO adapter is saved in the same servable PEFT format with the same
manifest fields plus ``method: "grpo"``, so the round, the registry, the gate and the canary
treat it like a DPO one. Continuing from a parent adapter trains it further; with
``grpo_beta > 0`` TRL copies it into a frozen ``ref`` adapter as the KL reference.

Importing this module loads TRL: import it where rounds run, not in the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from server.engine.fim import FimFormat
from trainer.config import TrainConfig
from trainer.generate import GenerationRequest, HfTokens, prepare_request
from trainer.judge import Judge, JudgeItem
from trainer.rewards import Components, RewardRule, cut_at_stops, format_ok
from trainer.sandbox import Sandbox
from trainer.tasks import Task
from trainer.train import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    AdapterTrainerMixin,
    NonFiniteGuard,
    TrainResult,
    _final_metrics,
    _load_model,
    _LogMetrics,
    _parent_fingerprint,
    _prepare_checkpoints,
    _progress_bars,
    _save_adapter,
    adapter_manifest,
    base_fingerprint,
)

__all__ = ["KaizenGRPOTrainer", "SealedReward", "reward_rule", "train_grpo_adapter"]

log = logging.getLogger(__name__)


def reward_rule(config: TrainConfig) -> RewardRule:
    """The reward rule a config describes."""
    return RewardRule(
        gated=config.grpo_gated,
        format_weight=config.grpo_format_weight,
        outcome_weight=config.grpo_outcome_weight,
        process_weight=config.grpo_process_weight,
    )


@dataclass(frozen=True)
class _Prepared:
    task: Task
    prompt: str  # the model's FIM prompt, as the server builds it
    stops: tuple[str, ...]  # where the server would stop the completion
    end_token_ids: frozenset[int]  # tokens that end a completion
    prompt_tokens: int


def _prepare(task: Task, tokenizer: Any) -> _Prepared:
    request = GenerationRequest(task.prompt, task.suffix, task.single_line)
    prepared = prepare_request(request, HfTokens(tokenizer))
    ends = set(prepared.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        ends.add(int(tokenizer.eos_token_id))
    return _Prepared(
        task=task,
        prompt=FimFormat().build(task.prompt, task.suffix),
        stops=tuple(prepared.stop),
        end_token_ids=frozenset(ends),
        prompt_tokens=len(prepared.prompt_token_ids),
    )


class SealedReward:
    """TRL's reward function: the sealed outcome of each completion, its format and (where the
    rule lets it count) the judge's score, combined by ``rule``. TRL passes the dataset's
    ``task_id`` column. Each call's counts go to TRL's log (``log_metric``) under ``outcome/``,
    ``format/`` and ``process/``, beside TRL's own ``reward``."""

    __name__ = "sealed"  # TRL's metric name: rewards/sealed/mean

    def __init__(
        self,
        prepared: Mapping[str, _Prepared],
        *,
        sandbox: Sandbox,
        judge: Judge | None,
        rule: RewardRule,
    ) -> None:
        if judge is None and rule.process_weight > 0:
            raise ValueError("a process weight above 0 needs a judge; pass one or set it to 0")
        self.prepared = prepared
        self.sandbox = sandbox
        self.judge = judge
        self.rule = rule

    def components(
        self, task_ids: Sequence[str], completions: Sequence[str], ids: Sequence[Sequence[int]]
    ) -> list[Components]:
        items = [self.prepared[t] for t in task_ids]
        texts, ended = [], []
        for item, completion, token_ids in zip(items, completions, ids, strict=True):
            text, stopped = cut_at_stops(completion, item.stops)
            texts.append(text)
            ended.append(stopped or bool(token_ids and token_ids[-1] in item.end_token_ids))
        programs = [item.task.program(text) for item, text in zip(items, texts, strict=True)]
        runs = self.sandbox.run_tests(
            [(program, item.task.test) for program, item in zip(programs, items, strict=True)]
        )
        passed = [run.passed for run in runs]
        asked = [i for i, p in enumerate(passed) if self.rule.needs_process(p)]
        process: list[float | None] = [None] * len(items)
        if asked and self.judge is not None:
            verdicts = self.judge.judge(
                [JudgeItem(items[i].task.prompt, texts[i], items[i].task.suffix) for i in asked]
            )
            for i, verdict in zip(asked, verdicts, strict=True):
                process[i] = verdict.score
        return [
            Components(format=format_ok(program, ended=e), passed=p, process=s)
            for program, e, p, s in zip(programs, ended, passed, process, strict=True)
        ]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        task_id: Sequence[str],
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        components = self.components(task_id, completions, completion_ids)
        rewards = self.rule.rewards(components)
        scores = [c.process for c in components if c.process is not None]
        n = len(components)
        counts = {
            "outcome/pass_rate": sum(c.passed for c in components) / n,
            "format/rate": sum(c.format for c in components) / n,
            # Completions shown to the judge: gated, the passing ones only.
            "process/judged": float(sum(self.rule.needs_process(c.passed) for c in components)),
        }
        if scores:
            counts["process/mean"] = sum(scores) / len(scores)
        if log_metric is not None:
            for name, value in counts.items():
                log_metric(name, value)
        return rewards


class KaizenGRPOTrainer(AdapterTrainerMixin, GRPOTrainer):
    """``GRPOTrainer`` with no telemetry and the DPO path's checkpoint handling."""


def train_grpo_adapter(
    *,
    base_model_dir: Path,
    tasks: Sequence[Task],
    config: TrainConfig,
    judge: Judge | None,
    parent_adapter: Path | None = None,
    output_dir: Path,
    sandbox: Sandbox | None = None,
    progress: bool = True,
    resume: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a LoRA adapter with outcome-gated GRPO on ``tasks``; on success
    ``output_dir/adapter`` holds it with ``manifest.json``, as :func:`trainer.train.train_adapter`
    leaves a DPO adapter (same format, same fields, ``method: "grpo"``).

    ``judge`` scores the process (None only with ``grpo_process_weight=0``: outcome-only GRPO).
    Tasks whose prompt leaves no room for ``grpo_max_completion_length`` tokens within
    ``max_length`` are dropped (``dropped_task_ids`` in the manifest).

    Example::

        result = train_grpo_adapter(
            base_model_dir=model_dir,
            tasks=load_mbpp(split="train")[:16],
            config=TrainConfig(method="grpo", max_steps=8, grpo_num_generations=4),
            judge=TransformersJudge(model_dir),
            output_dir=Path("rounds/1/train"),
        )
    """
    base_model_dir, output_dir = Path(base_model_dir), Path(output_dir)
    parent_adapter = Path(parent_adapter) if parent_adapter is not None else None
    if config.method != "grpo":
        raise ValueError(f"train_grpo_adapter trains method='grpo', not {config.method!r}")
    if not tasks:
        raise ValueError("no tasks to train on")
    if len({t.task_id for t in tasks}) != len(tasks):
        raise ValueError("task ids must be unique")
    adapter_dir = output_dir / ADAPTER_DIR
    if adapter_dir.exists():
        raise FileExistsError(f"{adapter_dir} exists; adapters are immutable, train elsewhere")
    rule = reward_rule(config)
    started = time.perf_counter()
    base = base_fingerprint(base_model_dir)
    parent = _parent_fingerprint(parent_adapter, base["sha256"])

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues at the right end
    budget = config.max_length - config.grpo_max_completion_length
    prepared = {t.task_id: _prepare(t, tokenizer) for t in tasks}
    kept = [t.task_id for t in tasks if prepared[t.task_id].prompt_tokens <= budget]
    dropped = sorted(set(prepared) - set(kept))
    if dropped:
        log.warning("event=tasks_dropped count=%d reason=prompt_too_long", len(dropped))
    if not kept:
        raise ValueError(
            f"no task's prompt fits max_length={config.max_length} minus "
            f"grpo_max_completion_length={config.grpo_max_completion_length}; raise max_length"
        )
    judge_id = (
        None if judge is None else {"name": judge.name, "prompt_version": judge.prompt_version}
    )
    run_key = _run_key(config, base["sha256"], parent, [prepared[k] for k in kept], judge_id)
    checkpoints = output_dir / CHECKPOINTS_DIR
    resume_from = _prepare_checkpoints(checkpoints, run_key, resume)

    reward = SealedReward(
        {k: prepared[k] for k in kept}, sandbox=sandbox or Sandbox(), judge=judge, rule=rule
    )
    args = _grpo_config(config, checkpoints, progress)
    with _progress_bars(progress):
        model, peft_config = _load_model(base_model_dir, parent_adapter, config)
        dataset = Dataset.from_list([{"prompt": prepared[k].prompt, "task_id": k} for k in kept])
        guard = NonFiniteGuard()
        trainer = KaizenGRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[guard, _LogMetrics()],
        )
        trainer.remove_callback(PrinterCallback)
        log.info(
            "event=train_start method=grpo tasks=%d group=%d gated=%s judge=%s parent=%s "
            "resume_from=%s device=%s",
            len(kept),
            config.grpo_num_generations,
            rule.gated,
            judge_id and judge_id["name"],
            parent_adapter,
            resume_from,
            trainer.args.device,
        )
        output = trainer.train(resume_from_checkpoint=resume_from)

    history = list(trainer.state.log_history)
    runtime = float(output.metrics.get("train_runtime", 0.0)) or 1e-9
    metrics = _final_metrics(history)
    tokens = float(trainer.state.num_input_tokens_seen or metrics.get("num_tokens", 0.0))
    tokens_per_s = tokens / runtime
    metrics["tokens_per_second"] = tokens_per_s
    steps = trainer.state.global_step
    result = TrainResult(
        adapter_dir=None,
        steps=steps,
        duration_s=time.perf_counter() - started,
        tokens_per_s=tokens_per_s,
        metrics=metrics,
        trained_pair_ids=[],
        stopped_reason=guard.reason,
        log_history=history,
        method="grpo",
        trained_task_ids=kept,
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
        reference=_reference(config, parent_adapter),
        pair_ids=[],
        dropped_pair_ids=[],
        task_ids=kept,
        dropped_task_ids=dropped,
        reward={"rule": asdict(rule), "judge": judge_id},
        **(extra_manifest or {}),
    )
    _save_adapter(policy, adapter_dir, manifest)
    shutil.rmtree(checkpoints, ignore_errors=True)
    result.adapter_dir = adapter_dir
    log.info(
        "event=adapter_trained method=grpo dir=%s steps=%d duration_s=%.1f reward=%s",
        adapter_dir,
        steps,
        result.duration_s,
        metrics.get("reward"),
    )
    return result


def _reference(config: TrainConfig, parent: Path | None) -> str:
    if config.grpo_beta == 0:
        return "none (grpo_beta=0)"
    return "parent adapter" if parent else "base model"


def _run_key(
    config: TrainConfig,
    base_sha256: str,
    parent: dict[str, Any] | None,
    prepared: Sequence[_Prepared],
    judge: dict[str, str] | None,
) -> str:
    payload = {
        "config": asdict(config),
        "base": base_sha256,
        "parent": parent and parent["sha256"],
        "tasks": [asdict(p.task) for p in prepared],
        "judge": judge,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _grpo_config(config: TrainConfig, checkpoints: Path, progress: bool) -> GRPOConfig:
    on_gpu = torch.cuda.is_available()
    bf16 = config.bf16 if config.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    return GRPOConfig(
        output_dir=str(checkpoints),
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        # One optimiser step: grpo_tasks_per_step tasks, each with its whole group.
        per_device_train_batch_size=config.grpo_tasks_per_step * config.grpo_num_generations,
        gradient_accumulation_steps=1,
        num_generations=config.grpo_num_generations,
        max_completion_length=config.grpo_max_completion_length,
        temperature=config.grpo_temperature,
        beta=config.grpo_beta,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        disable_dropout=config.lora_dropout == 0,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=not on_gpu,
        dataloader_pin_memory=on_gpu,
        log_completions=False,
    )
