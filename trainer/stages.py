"""The stages of a training round, in order (:data:`STAGES`), each a ``compute`` that makes
its result and a ``take`` that moves it into the round (see :class:`trainer.pipeline.Stage`):

    pairs      re-run texts in the sandbox, resample one-sided contexts with the parent adapter,
               keep pass/fail pairs (trainer.pairs); with a judge whose agreement with the
               sealed verdicts clears the threshold, judge pairs where nothing executed
               (trainer.judging); fitted to the token budget (trainer.budget)
    selection  CDAS (trainer.selection), then the min_pairs check; a dry run ends here
    train      DPO+NLL on a LoRA adapter continuing from the parent (trainer.train)
    register   publish the adapter to the store, then register it as a ``candidate``
    gate       gate it against the active adapter and make an approved one the canary
               (trainer.handoff), when the round is given a gate

A GRPO round (``config.method == "grpo"``) has ``tasks`` (self-contained tasks the sandbox can
run; a dry run ends there) in place of ``pairs`` and ``selection``, trains with
:func:`trainer.grpo.train_grpo_adapter`, and registers and gates its adapter like a DPO one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, get_args

from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store.artifacts import publish_adapter
from trainer.budget import fit_pairs
from trainer.config import TrainConfig
from trainer.generate import GenerationRequest, Generator, GeneratorFactory
from trainer.judge import Judge, TransformersJudge
from trainer.judging import JudgeOptions, judge_round
from trainer.pairs import (
    Context,
    Pair,
    PairInfo,
    ResampleAsk,
    Source,
    build_pairs,
    record_id,
)
from trainer.pipeline import Round, RoundOptions, Stage
from trainer.records import OutcomeRecord
from trainer.sandbox import Sandbox
from trainer.secrets import SecretScanner
from trainer.tasks import Task

__all__ = ["STAGES", "chosen_logp_alarm", "grpo_tasks", "tests_for"]

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.json"
SELECTION_FILE = "selection.json"
TRAIN_DIR = "train"  # the trainer's checkpoints and the adapter
TRAINED_FILE = "trained.json"
TASKS_FILE = "tasks.json"  # a GRPO round's tasks
REGISTERED_FILE = "registered.json"
GATE_FILE = "gate.json"


def tests_for(context: Context) -> str | None:
    """The newest test code CI sent for any record of this context, if any."""
    codes = [r.test_code for r in context.records if r.test_code]
    return codes[-1] if codes else None


def chosen_logp_alarm(history: Sequence[dict[str, Any]], floor: float = 0.0) -> str | None:
    """An alarm text when the chosen side's log-probs fell below the reference's late in
    training: the mean ``rewards/chosen`` of the last quarter of logged steps under ``floor``.

    Plain DPO on code tends to push the chosen likelihood down along with the rejected one;
    the NLL term is there to prevent it, and this says when it did not."""
    values = [float(h["rewards/chosen"]) for h in history if "rewards/chosen" in h]
    if not values:
        return None
    tail = values[-max(1, len(values) // 4) :]
    mean = sum(tail) / len(tail)
    if mean < floor:
        return (
            f"chosen log-probs fell: mean rewards/chosen over the last {len(tail)} logged "
            f"steps is {mean:.4f} (< {floor}); the policy now likes the passing code less than "
            "the reference did. Consider a higher nll_weight or a lower learning rate."
        )
    return None


def _batch_resampler(
    get_generator: Callable[[], Generator],
    adapter: Path | None,
    options: RoundOptions,
    counts: dict[str, int] | None = None,
) -> Callable[[Sequence[ResampleAsk], int], list[list[str]]]:
    """Samples as the user was served: the recorded ``single_line``, stop strings and
    ``max_tokens`` (the round's ``resample_max_tokens`` where none was recorded). Samples cut
    off by ``max_tokens`` are left out: they are not answers."""

    def resample(asks: Sequence[ResampleAsk], n: int) -> list[list[str]]:
        requests = [
            GenerationRequest(
                prompt=a.prompt,
                suffix=a.suffix,
                single_line=a.single_line,
                stop=a.stop,
                max_tokens=a.max_tokens,
                context=a.fim_context,
            )
            for a in asks
        ]
        generator = get_generator()
        kwargs: dict[str, Any] = {
            "adapter": adapter,
            "n": n,
            "temperature": options.resample_temperature,
            "max_tokens": options.resample_max_tokens,
            "seed": options.seed,
            "progress": True,
        }
        choices = getattr(generator, "generate_choices", None)
        if choices is None:  # a generator that cannot say how a sample ended
            return generator.generate(requests, **kwargs)
        rows = choices(requests, **kwargs)
        kept = [[c.text for c in row if c.finish_reason != "length"] for row in rows]
        if counts is not None:  # shown in the funnel: a model that never ends gives no pairs
            counts["samples"] = counts.get("samples", 0) + sum(len(row) for row in rows)
            counts["samples_cut_off"] = counts.get("samples_cut_off", 0) + sum(
                len(row) - len(k) for row, k in zip(rows, kept, strict=True)
            )
        return kept

    return resample


def _build_pairs_stage(
    records: list[OutcomeRecord],
    *,
    options: RoundOptions,
    parent_dir: Path | None,
    generator_factory: GeneratorFactory | None,
    base_model_dir: Path,
    budget: int,
    excluded: frozenset[str] = frozenset(),
    session_factory: sessionmaker[Session] | None = None,
    judge: Judge | None = None,
) -> dict[str, Any]:
    generator: Generator | None = None

    def get_generator() -> Generator:
        nonlocal generator
        if generator is None:
            assert generator_factory is not None
            generator = generator_factory()
        return generator

    resampled: dict[str, int] = {"samples": 0, "samples_cut_off": 0}
    resample = (
        _batch_resampler(get_generator, parent_dir, options, resampled)
        if generator_factory is not None and options.n_resample > 0
        else None
    )
    try:
        built = build_pairs(
            records,
            sandbox=Sandbox(workers=options.sandbox_workers),
            tests_for=tests_for,
            resample_batch=resample,
            n_resample=options.n_resample,
            flaky_reruns=options.flaky_reruns,
            max_pairs_per_context=options.max_pairs_per_context,
            seed=options.seed,
            excluded_repositories=excluded,
            max_fix_distance=options.max_fix_distance,
            max_token_share=options.max_token_share,
        )
    finally:
        if generator is not None:
            generator.close()  # frees the engine's memory before training
    # The judge, after the engine is closed (on a CPU host both would not fit at once): judge
    # pairs only where nothing executed, and only once it agrees with the sealed verdicts.
    judge_funnel: dict[str, Any] = {"used": False, "pairs": 0, "reason": "no judge configured"}
    if judge is not None and session_factory is not None:
        judged, judge_funnel = judge_round(
            session_factory=session_factory,
            records=records,
            judge=judge,
            options=_judge_options(options),
            sandbox=Sandbox(workers=options.sandbox_workers),
            excluded_repositories=excluded,
            secret_scanner=SecretScanner(),
        )
        if judged is not None:
            built.pairs += judged.pairs
            built.info.update(judged.info)
            built.funnel["pairs_by_source"]["judge"] = len(judged.pairs)
            built.funnel["pairs"] = len(built.pairs)
    from transformers import AutoTokenizer

    # Fitted here, once, so that pairs.json holds exactly what selection scores and training
    # trains, under the same budget.
    fitted = fit_pairs(built.pairs, AutoTokenizer.from_pretrained(str(base_model_dir)), budget)
    return {
        "pairs": [asdict(p) for p in fitted.pairs],
        "info": {p.id: asdict(built.info[p.id]) for p in fitted.pairs},
        "funnel": {
            **built.funnel,
            "resampling": resampled,
            "fit": fitted.funnel,
            "pairs_fitted": len(fitted.pairs),
            "judge": judge_funnel,
        },
        "dropped_records": built.dropped_records,
    }


def _judge_options(options: RoundOptions) -> JudgeOptions:
    return JudgeOptions(
        min_agreement=options.judge_min_agreement,
        min_judged=options.judge_min_judged,
        calibration_items=options.judge_calibration_items,
        max_alternatives=options.judge_max_alternatives,
        max_pairs=options.judge_max_pairs,
        pair_weight=options.judge_pair_weight,
        max_pairs_per_context=options.max_pairs_per_context,
        seed=options.seed,
    )


def _judge_for(options: RoundOptions) -> Judge | None:
    """The round's judge: a local model directory (``judge_model``), or none."""
    if not options.judge_model:
        return None
    return TransformersJudge(Path(options.judge_model))


def _select_stage(
    pairs: list[Pair],
    info: dict[str, PairInfo],
    *,
    options: RoundOptions,
    base_model_dir: Path,
    parent_dir: Path | None,
    max_length: int,
) -> dict[str, Any]:
    if not options.select or not pairs:
        return {"selected": [p.id for p in pairs], "funnel": {"selected": len(pairs)}}
    from trainer.selection import select_pairs

    selected = select_pairs(
        pairs,
        model_dir=base_model_dir,
        adapter_dir=parent_dir,
        fraction=options.select_fraction,
        max_repository_share=options.max_repository_share,
        repositories={pid: i.repository for pid, i in info.items()},
        seed=options.seed,
        max_length=max_length,
    )
    return {
        "selected": [p.id for p in selected.pairs],
        "funnel": selected.funnel,
        "scores": {pid: asdict(score) for pid, score in selected.scores.items()},
    }


def _adapter_name(round_id: int, adapter_dir: Path) -> str:
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    return f"kaizen-r{round_id}-{hashlib.sha256(weights).hexdigest()[:8]}"


def _compute_pairs(r: Round) -> dict[str, Any]:
    return _build_pairs_stage(
        r.records,
        options=r.options,
        parent_dir=r.parent_dir,
        generator_factory=r.generator_factory,
        base_model_dir=r.base_model_dir,
        budget=r.config.max_length,
        excluded=r.excluded,
        session_factory=r.session_factory,
        judge=_judge_for(r.options),
    )


def _take_pairs(r: Round, built: dict[str, Any]) -> None:
    r.pairs = [Pair(**p) for p in built["pairs"]]
    r.info = {pid: PairInfo(**i) for pid, i in built["info"].items()}
    r.dropped_records = built.get("dropped_records", {})
    r.funnel["pairs"] = built["funnel"]
    # The judge's measured agreement with the sealed verdicts (None: no judge, or nothing to
    # measure it on), beside the pairs it was allowed to make.
    judge = built["funnel"].get("judge") or {}
    r.funnel["judge_agreement"] = (judge.get("agreement") or {}).get("agreement")


def _compute_selection(r: Round) -> dict[str, Any]:
    return _select_stage(
        r.pairs,
        r.info,
        options=r.options,
        base_model_dir=r.base_model_dir,
        parent_dir=r.parent_dir,
        max_length=r.config.max_length,
    )


def _take_selection(r: Round, chosen: dict[str, Any]) -> str | None:
    keep = set(chosen["selected"])
    r.selected = [p for p in r.pairs if p.id in keep]
    r.funnel["selection"] = chosen["funnel"]
    r.funnel["selected_by_source"] = {
        source: sum(1 for p in r.selected if p.source == source) for source in get_args(Source)
    }
    if r.dry_run:
        return "dry_run"
    if len(r.selected) < r.options.min_pairs:
        r.report.error = (
            f"{len(r.selected)} pairs after selection, fewer than min_pairs={r.options.min_pairs}"
        )
        log.warning("event=round_skipped id=%s reason=%r", r.report.round_id, r.report.error)
        return "skipped"
    return None


def _compute_training(r: Round) -> dict[str, Any]:
    """Train, and return the result as JSON (``trained.json``), so that a round killed after
    training never trains again over the adapter it may already have registered."""
    if r.config.method == "grpo":
        return _train_grpo(r)
    from trainer.launch import train_adapter_launched

    used = {r.info[p.id].context_key for p in r.selected}
    # The records behind the trained contexts, less those governance left out.
    record_ids = sorted(
        rid
        for rec in r.records
        if rec.context_key in used and (rid := record_id(rec)) not in r.dropped_records
    )
    result = train_adapter_launched(
        num_processes=r.train_processes,  # 1: in this process; more: accelerate launch (DDP)
        base_model_dir=r.base_model_dir,
        pairs=r.selected,
        config=r.config,
        parent_adapter=r.parent_dir,
        output_dir=r.work_dir / TRAIN_DIR,
        progress=r.progress,
        resume=True,  # from the trainer's last checkpoint, when a killed round resumes
        extra_manifest={
            "round_id": r.report.round_id,
            "parent_adapter_name": r.report.parent_adapter,
            "record_ids": record_ids,
            "funnel": r.funnel,
        },
    )
    return result.to_json()


def _take_training(r: Round, trained: dict[str, Any]) -> str | None:
    r.trained = trained
    r.funnel["trained_pairs"] = len(trained["trained_pair_ids"])
    if trained.get("method") == "grpo":
        r.funnel["trained_tasks"] = len(trained["trained_task_ids"])
    r.report.metrics = {
        **trained["metrics"],
        "steps": trained["steps"],
        "tokens_per_second": trained["tokens_per_s"],
    }
    alarm = chosen_logp_alarm(trained["log_history"], r.options.chosen_reward_floor)
    if alarm:
        r.report.alarms.append(alarm)
        log.warning("event=round_alarm id=%s alarm=%r", r.report.round_id, alarm)
    if trained["stopped_reason"] is not None or trained["adapter_dir"] is None:
        r.report.error = trained["stopped_reason"] or "training saved no adapter"
        log.error("event=round_stopped id=%s reason=%r", r.report.round_id, r.report.error)
        return "stopped"
    return None


def _compute_registration(r: Round) -> dict[str, Any]:
    """Publish the adapter to the store, then register it as a ``candidate``."""
    round_id = r.report.round_id
    assert round_id is not None and r.trained is not None and r.trained["adapter_dir"]
    adapter_dir = Path(r.trained["adapter_dir"])
    name = _adapter_name(round_id, adapter_dir)
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    with r.session_factory() as session:
        adapter = registry.register_adapter(
            session=session,
            name=name,
            path=str(adapter_dir.resolve()),
            base_sha256=manifest["base_model"]["sha256"],
            manifest=manifest,
            parent_id=r.parent_id,
            round_id=round_id,
            actor="trainer",
            artifact=publish_adapter(adapter_dir, name=name),  # uploaded first
        )
        return {"adapter_id": adapter.id, "name": name, "dir": str(adapter_dir)}


def _take_registration(r: Round, registered: dict[str, Any]) -> None:
    r.report.adapter_name = registered["name"]
    r.report.adapter_dir = Path(registered["dir"])
    r.save(adapter_id=registered["adapter_id"])
    log.info(
        "event=round_registered id=%s adapter=%s pairs=%d",
        r.report.round_id,
        registered["name"],
        len(r.selected),
    )


def _compute_gate(r: Round) -> dict[str, Any]:
    assert r.gate is not None and r.report.adapter_name is not None
    return r.gate(r.session_factory, r.report.adapter_name)


def _has_gate(r: Round) -> bool:
    return r.gate is not None


def _take_gate(r: Round, decision: dict[str, Any]) -> None:
    r.report.gate = decision
    r.funnel["gate"] = decision


# -- a GRPO round: self-contained tasks in place of pairs and selection -------------------------

# What the gate and the loop benchmark hold out: a GRPO round never trains on them.
HELD_OUT_SUITES = ("mbpp_dev", "mbpp_test", "humaneval", "humaneval_fim")


def _is_dpo(r: Round) -> bool:
    return r.config.method == "dpo"


def _is_grpo(r: Round) -> bool:
    return r.config.method == "grpo"


def grpo_tasks(config: TrainConfig) -> list[Task]:
    """The tasks a GRPO round trains on: ``config.grpo_suite`` (never a held-out one), the
    first ``grpo_max_tasks`` in its order."""
    from trainer.evaluate import load_suite
    from trainer.tasks import mbpp_path

    if config.grpo_suite in HELD_OUT_SUITES:
        raise ValueError(
            f"grpo_suite={config.grpo_suite!r} is held out for the gate and the benchmarks; "
            "train on 'mbpp_train'"
        )
    tasks = load_suite(config.grpo_suite, mbpp_path=mbpp_path())
    return tasks[: config.grpo_max_tasks] if config.grpo_max_tasks else tasks


def _compute_tasks(r: Round) -> dict[str, Any]:
    tasks = grpo_tasks(r.config)
    return {"funnel": {"suite": r.config.grpo_suite, "tasks": len(tasks)}}


def _take_tasks(r: Round, chosen: dict[str, Any]) -> str | None:
    r.funnel["tasks"] = chosen["funnel"]
    return "dry_run" if r.dry_run else None


def _train_grpo(r: Round) -> dict[str, Any]:
    from trainer.grpo import train_grpo_adapter
    from trainer.judge import TransformersJudge

    if r.train_processes > 1:
        log.warning("event=grpo_one_process train_processes=%d", r.train_processes)
    # The recipe's judge, else the round's (KAIZEN_JUDGE_MODEL), else the policy's own base.
    judge_dir = Path(r.config.grpo_judge_model or r.options.judge_model or r.base_model_dir)
    judge = TransformersJudge(judge_dir) if r.config.grpo_process_weight > 0 else None
    result = train_grpo_adapter(
        base_model_dir=r.base_model_dir,
        tasks=grpo_tasks(r.config),
        config=r.config,
        judge=judge,
        parent_adapter=r.parent_dir,
        output_dir=r.work_dir / TRAIN_DIR,
        progress=r.progress,
        resume=True,
        extra_manifest={
            "round_id": r.report.round_id,
            "parent_adapter_name": r.report.parent_adapter,
            "record_ids": [],  # trained on no record: the gate's recorded suite keeps them all
            "funnel": r.funnel,
        },
    )
    return result.to_json()


# The round, in order. Each stage is done once per round, however often the round is resumed
# (a stage killed half-way starts again; training from the trainer's own last checkpoint).
STAGES: tuple[Stage, ...] = (
    Stage("pairs", _compute_pairs, _take_pairs, checkpoint=PAIRS_FILE, when=_is_dpo),
    Stage(
        "selection", _compute_selection, _take_selection, checkpoint=SELECTION_FILE, when=_is_dpo
    ),
    Stage("tasks", _compute_tasks, _take_tasks, checkpoint=TASKS_FILE, when=_is_grpo),
    Stage("train", _compute_training, _take_training, checkpoint=TRAINED_FILE),
    Stage("register", _compute_registration, _take_registration, checkpoint=REGISTERED_FILE),
    Stage("gate", _compute_gate, _take_gate, checkpoint=GATE_FILE, when=_has_gate),
)
