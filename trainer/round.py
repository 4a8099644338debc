"""One training round, start to finish: recorded outcomes -> execution-verified pairs -> CDAS
selection -> DPO+NLL on a LoRA adapter -> a ``candidate`` in the registry.

A round continues from the active adapter (or the one it is given): that adapter resamples
contexts that lack a side, scores the pairs for selection, is the trainable starting point and
the DPO reference, so round k learns from round k-1's own samples (CodeLutra's iteration).

Each stage writes its result into the round's work directory before the next starts
(``pairs.json``, ``selection.json``, then the trainer's checkpoints), so a killed round resumes
where it stopped: :func:`run_round` with ``resume_round_id`` skips finished stages and training
continues from its last checkpoint. Everything a round learns about itself (the funnel, TRL's
metrics, stage durations, alarms, why it stopped) is stored on its ``training_rounds`` row.

A round whose loss or gradients go non-finite stops at once: nothing is registered, the active
adapter stays, and the row says why (status ``stopped``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store import rounds as round_store
from server.store.artifacts import publish_adapter
from server.store.governance import excluded_repositories
from server.store.models import Adapter, ApiToken, Completion
from trainer.budget import fit_pairs
from trainer.config import TrainConfig
from trainer.pairs import (
    DEFAULT_MAX_FIX_DISTANCE,
    DEFAULT_MAX_TOKEN_SHARE,
    Context,
    Pair,
    PairInfo,
    ResampleAsk,
    Source,
    build_pairs,
    record_id,
)
from trainer.records import OutcomeRecord, load_outcome_records
from trainer.sandbox import Sandbox

__all__ = ["RoundOptions", "RoundReport", "run_round", "chosen_logp_alarm"]

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.json"
SELECTION_FILE = "selection.json"
TRAIN_DIR = "train"


@dataclass
class RoundOptions:
    """How a round turns records into pairs and picks the ones to train on."""

    n_resample: int = field(
        default=8, metadata={"help": "Samples per tested context that lacks a side (0: none)."}
    )
    resample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    resample_max_tokens: int = field(default=384, metadata={"help": "Tokens per sample."})
    flaky_reruns: int = field(
        default=1, metadata={"help": "Re-runs of a failing text; a pass on any makes it flaky."}
    )
    max_pairs_per_context: int = field(default=4, metadata={"help": "Cap per prompt."})
    max_fix_distance: float = field(
        default=DEFAULT_MAX_FIX_DISTANCE,
        metadata={"help": "Largest normalised edit distance of a fix from the served text."},
    )
    max_token_share: float = field(
        default=DEFAULT_MAX_TOKEN_SHARE,
        metadata={"help": "Largest share of the pairs one reporting CI token may be behind."},
    )
    select: bool = field(default=True, metadata={"help": "Apply CDAS selection (else train all)."})
    select_fraction: float = field(
        default=0.5, metadata={"help": "Share of each cluster kept, by IFD."}
    )
    max_repository_share: float = field(
        default=0.5, metadata={"help": "Largest share of the selection one repository may hold."}
    )
    min_pairs: int = field(
        default=4, metadata={"help": "Fewer pairs than this after selection: skip the round."}
    )
    sandbox_workers: int = field(default=2, metadata={"help": "Parallel sandbox runs."})
    seed: int = field(default=0, metadata={"help": "Seed of pairing tie-breaks and selection."})
    # An alarm is raised when the chosen side's mean DPO reward (policy minus reference
    # log-prob, times beta) over the last quarter of logged steps is below this.
    chosen_reward_floor: float = field(default=0.0)

    def __post_init__(self) -> None:
        if self.n_resample < 0 or self.flaky_reruns < 0:
            raise ValueError("n_resample and flaky_reruns must be >= 0")
        if not 0 < self.select_fraction <= 1:
            raise ValueError(f"select_fraction must be in (0, 1], got {self.select_fraction}")
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be at least 1, got {self.min_pairs}")
        if not 0 <= self.max_fix_distance <= 1:
            raise ValueError(f"max_fix_distance must be in [0, 1], got {self.max_fix_distance}")
        if not 0 < self.max_token_share <= 1:
            raise ValueError(
                f"max_token_share must be in (0, 1] (1: no cap), got {self.max_token_share}"
            )


@dataclass
class RoundReport:
    """What :func:`run_round` did; the same facts are stored on the round's row."""

    round_id: int | None  # None for a dry run
    status: str  # "succeeded" | "stopped" | "skipped" | "failed" | "dry_run"
    funnel: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    alarms: list[str] = field(default_factory=list)
    adapter_name: str | None = None
    adapter_dir: Path | None = None
    parent_adapter: str | None = None
    error: str | None = None
    gate: dict[str, Any] | None = None  # the gate's decision, when the worker ran it


class Generator(Protocol):
    """What a round needs of an inference engine (``trainer.generate.VllmGenerator``)."""

    def generate(self, requests: Sequence[Any], **kwargs: Any) -> list[list[str]]: ...

    def close(self) -> None: ...


GeneratorFactory = Callable[[], Generator]


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


@contextmanager
def _stage(durations: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    log.info("event=round_stage_start stage=%s", name)
    try:
        yield
    finally:
        durations[name] = round(durations.get(name, 0.0) + time.perf_counter() - started, 3)
        log.info("event=round_stage_end stage=%s duration_s=%.1f", name, durations[name])


def _count_completions(session: Session, until: datetime) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Completion).where(Completion.created_at <= until)
        )
        or 0
    )


def _token_names(session: Session, ids: set[int]) -> dict[str, str]:
    if not ids:
        return {}
    rows = session.execute(select(ApiToken.id, ApiToken.name).where(ApiToken.id.in_(ids)))
    return {str(token_id): name for token_id, name in sorted(rows.tuples())}


def _save_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    tmp.rename(path)  # a reader never sees half a file


def _batch_resampler(
    get_generator: Callable[[], Generator],
    adapter: Path | None,
    options: RoundOptions,
    counts: dict[str, int] | None = None,
) -> Callable[[Sequence[ResampleAsk], int], list[list[str]]]:
    """Samples as the user was served: the recorded ``single_line``, stop strings and
    ``max_tokens`` (the round's ``resample_max_tokens`` where none was recorded). Samples cut
    off by ``max_tokens`` are left out: they are not answers."""
    from trainer.generate import GenerationRequest

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
        },
        "dropped_records": built.dropped_records,
    }


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


def _parent(session: Session, name: str | None) -> Adapter | None:
    if name is None:
        return registry.active_adapter(session=session)
    adapter = registry.get_adapter(session=session, name=name)
    if adapter is None:
        raise LookupError(f"no adapter named {name!r} in the registry (see `kaizen adapters`)")
    return adapter


def run_round(
    *,
    session_factory: sessionmaker[Session],
    base_model_dir: Path,
    rounds_dir: Path,
    config: TrainConfig,
    options: RoundOptions | None = None,
    generator_factory: GeneratorFactory | None = None,
    parent: str | None = None,
    trigger: str = "manual",
    dry_run: bool = False,
    resume_round_id: int | None = None,
    progress: bool = True,
) -> RoundReport:
    """Run (or, with ``resume_round_id``, finish) one round; see the module docstring.

    ``parent`` names the adapter to continue from (default: the active one; none: the base).
    ``generator_factory`` builds the engine that resamples (None: no resampling). A dry run
    builds pairs and selects them, reports the funnel, and trains and stores nothing.

    Example::

        report = run_round(
            session_factory=factory,
            base_model_dir=Path("~/.kaizen/models/qwen2.5-coder-0.5b-instruct").expanduser(),
            rounds_dir=Path("~/.kaizen/rounds").expanduser(),
            config=TrainConfig(),
            generator_factory=lambda: VllmGenerator(model_dir),
        )
        print(report.status, report.funnel, report.adapter_name)
    """
    options = options or RoundOptions()
    base_model_dir = Path(base_model_dir)
    durations: dict[str, float] = {}

    with session_factory() as session:
        if resume_round_id is not None:
            row = round_store.get_round(session=session, round_id=resume_round_id)
            if row is None or row.status != "running":
                raise ValueError(f"round {resume_round_id} is not an unfinished round")
            parent_row = (
                session.get(Adapter, row.parent_adapter_id) if row.parent_adapter_id else None
            )
            until, round_id, work_dir = row.records_until, row.id, Path(row.work_dir)
            durations.update(row.durations or {})
            log.info("event=round_resume id=%d dir=%s", round_id, work_dir)
        else:
            parent_row = _parent(session, parent)
            until = datetime.now(UTC)
            round_id = None
            work_dir = Path(tempfile.mkdtemp(prefix="kaizen-dry-run-")) if dry_run else Path()
        parent_name = parent_row.name if parent_row is not None else None
        parent_id = parent_row.id if parent_row is not None else None
        parent_dir = Path(parent_row.path) if parent_row is not None else None
        if round_id is None and not dry_run:
            rounds_dir.mkdir(parents=True, exist_ok=True)
            row = round_store.start_round(
                session=session,
                trigger=trigger,
                records_until=until,
                parent_adapter_id=parent_id,
                work_dir="",
                config={"train": asdict(config), "round": asdict(options)},
            )
            round_id = row.id
            work_dir = rounds_dir / f"round-{round_id:05d}"
            round_store.update_round(session=session, round_id=round_id, work_dir=str(work_dir))
            log.info("event=round_start id=%d trigger=%s parent=%s", round_id, trigger, parent_name)
        work_dir.mkdir(parents=True, exist_ok=True)
        with _stage(durations, "load_records"):
            records = load_outcome_records(session=session, until=until)
            completions = _count_completions(session, until)
            # Read when the round starts: `kaizen repos exclude` holds from the next round on.
            excluded = excluded_repositories(session=session)
            reporters = _token_names(session, {r.token_id for r in records if r.token_id})

    def save(**fields: Any) -> None:
        if round_id is None:
            return
        with session_factory() as session:
            round_store.update_round(session=session, round_id=round_id, **fields)

    funnel: dict[str, Any] = {
        "completions": completions,
        "outcome_records": len(records),
        "records_with_verdict": sum(1 for r in records if r.passed or r.failed),
        "excluded_repositories": sorted(excluded),
        # Who the token ids of the pairs' `token_shares` are (`kaizen tokens list`).
        "reporting_tokens": reporters,
    }
    report = RoundReport(
        round_id=round_id,
        status="running",
        funnel=funnel,
        durations=durations,
        parent_adapter=parent_name,
    )
    try:
        # -- pairs
        pairs_file = work_dir / PAIRS_FILE
        if pairs_file.is_file():
            built = json.loads(pairs_file.read_text())
        else:
            with _stage(durations, "pairs"):
                built = _build_pairs_stage(
                    records,
                    options=options,
                    parent_dir=parent_dir,
                    generator_factory=generator_factory,
                    base_model_dir=base_model_dir,
                    budget=config.max_length,
                    excluded=excluded,
                )
            _save_json(pairs_file, built)
        pairs = [Pair(**p) for p in built["pairs"]]
        info = {pid: PairInfo(**i) for pid, i in built["info"].items()}
        funnel["pairs"] = built["funnel"]
        save(funnel=funnel, durations=durations)

        # -- selection
        selection_file = work_dir / SELECTION_FILE
        if selection_file.is_file():
            chosen = json.loads(selection_file.read_text())
        else:
            with _stage(durations, "selection"):
                chosen = _select_stage(
                    pairs,
                    info,
                    options=options,
                    base_model_dir=base_model_dir,
                    parent_dir=parent_dir,
                    max_length=config.max_length,
                )
            _save_json(selection_file, chosen)
        keep = set(chosen["selected"])
        selected = [p for p in pairs if p.id in keep]
        funnel["selection"] = chosen["funnel"]
        funnel["selected_by_source"] = {
            source: sum(1 for p in selected if p.source == source) for source in get_args(Source)
        }
        save(funnel=funnel, durations=durations)

        if dry_run:
            report.status = "dry_run"
            return report
        if len(selected) < options.min_pairs:
            report.status = "skipped"
            report.error = (
                f"{len(selected)} pairs after selection, fewer than min_pairs={options.min_pairs}"
            )
            log.warning("event=round_skipped id=%s reason=%r", round_id, report.error)
            save(status="skipped", error=report.error, funnel=funnel, durations=durations)
            return report

        # -- training
        from trainer.train import train_adapter

        used = {info[p.id].context_key for p in selected}
        # The records behind the trained contexts, less those governance left out.
        left_out = built.get("dropped_records", {})
        record_ids = sorted(
            rid for r in records if r.context_key in used and (rid := record_id(r)) not in left_out
        )
        with _stage(durations, "train"):
            result = train_adapter(
                base_model_dir=base_model_dir,
                pairs=selected,
                config=config,
                parent_adapter=parent_dir,
                output_dir=work_dir / TRAIN_DIR,
                progress=progress,
                resume=True,
                extra_manifest={
                    "round_id": round_id,
                    "parent_adapter_name": parent_name,
                    "record_ids": record_ids,
                    "funnel": funnel,
                },
            )
        funnel["trained_pairs"] = len(result.trained_pair_ids)
        report.metrics = {
            **result.metrics,
            "steps": result.steps,
            "tokens_per_second": result.tokens_per_s,
        }
        alarm = chosen_logp_alarm(result.log_history, options.chosen_reward_floor)
        if alarm:
            report.alarms.append(alarm)
            log.warning("event=round_alarm id=%s alarm=%r", round_id, alarm)
        if result.stopped_reason is not None or result.adapter_dir is None:
            report.status = "stopped"
            report.error = result.stopped_reason or "training saved no adapter"
            log.error("event=round_stopped id=%s reason=%r", round_id, report.error)
            save(
                status="stopped",
                error=report.error,
                funnel=funnel,
                metrics=report.metrics,
                durations=durations,
                alarms=report.alarms,
            )
            return report

        # -- registry
        assert round_id is not None
        name = _adapter_name(round_id, result.adapter_dir)
        manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
        with session_factory() as session:
            adapter = registry.register_adapter(
                session=session,
                name=name,
                path=str(result.adapter_dir.resolve()),
                base_sha256=manifest["base_model"]["sha256"],
                manifest=manifest,
                parent_id=parent_id,
                round_id=round_id,
                actor="trainer",
                artifact=publish_adapter(result.adapter_dir, name=name),  # uploaded first
            )
            adapter_id = adapter.id
        report.status = "succeeded"
        report.adapter_name, report.adapter_dir = name, result.adapter_dir
        save(
            status="succeeded",
            adapter_id=adapter_id,
            funnel=funnel,
            metrics=report.metrics,
            durations=durations,
            alarms=report.alarms,
        )
        log.info(
            "event=round_succeeded id=%d adapter=%s pairs=%d steps=%d",
            round_id,
            name,
            len(selected),
            result.steps,
        )
        return report
    except Exception as exc:
        report.status = "failed"
        report.error = f"{type(exc).__name__}: {exc}"
        log.exception("event=round_failed id=%s", round_id)
        save(status="failed", error=report.error, funnel=funnel, durations=durations)
        raise
