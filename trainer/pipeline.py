"""The machinery of a training round: its options, its state while it runs, its report, and
the one helper that runs each of its stages (:func:`run_stage`).

The stages themselves are in :mod:`trainer.stages`; :func:`trainer.round.run_round` runs them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.store import rounds as round_store
from trainer.config import TrainConfig
from trainer.generate import GeneratorFactory
from trainer.pairs import DEFAULT_MAX_FIX_DISTANCE, DEFAULT_MAX_TOKEN_SHARE, Pair, PairInfo
from trainer.records import OutcomeRecord

__all__ = ["GateStep", "Round", "RoundOptions", "RoundReport", "Stage", "run_stage", "timed"]

log = logging.getLogger(__name__)


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
    # The judge (trainer.judging): judge pairs where nothing executed, only once the judge
    # agrees with the round's sealed verdicts often enough. "" : no judge.
    judge_model: str = field(
        default="", metadata={"help": "The judge's model directory ('': no judge pairs)."}
    )
    judge_min_agreement: float = field(
        default=0.75, metadata={"help": "Agreement with sealed verdicts judge pairs need."}
    )
    judge_min_judged: int = field(
        default=32, metadata={"help": "Sealed verdicts the agreement is measured on, at least."}
    )
    judge_calibration_items: int = field(
        default=64, metadata={"help": "Sealed completions the judge is measured on per round."}
    )
    judge_max_alternatives: int = field(
        default=256, metadata={"help": "Alternatives (no verdict) judged per round, at most."}
    )
    judge_max_pairs: int = field(default=64, metadata={"help": "Judge pairs per round, at most."})
    judge_pair_weight: float = field(
        default=0.5, metadata={"help": "A judge pair's loss weight (an execution pair's: 1)."}
    )

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
        if not 0 < self.judge_pair_weight < 1:
            raise ValueError(
                "judge_pair_weight must be in (0, 1): a judge pair weighs less than an "
                f"execution pair, got {self.judge_pair_weight}"
            )
        if not 0 <= self.judge_min_agreement <= 1:
            raise ValueError(f"judge_min_agreement is a share, got {self.judge_min_agreement}")


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
    gate: dict[str, Any] | None = None  # the gate's decision, when the round had that stage


# The round's last stage, given the round's sessions and the candidate's name: gate it and
# hand it on (trainer.handoff.gate_and_canary); returns the decision, reasons and changes.
GateStep = Callable[[sessionmaker[Session], str], dict[str, Any]]


@dataclass
class Round:
    """What a running round knows: its inputs, what its finished stages left, and the report
    that its ``training_rounds`` row mirrors (:meth:`save`)."""

    session_factory: sessionmaker[Session]
    base_model_dir: Path
    work_dir: Path
    config: TrainConfig
    options: RoundOptions
    generator_factory: GeneratorFactory | None
    gate: GateStep | None
    dry_run: bool
    progress: bool
    train_processes: int  # KAIZEN_TRAIN_NUM_PROCESSES (trainer.launch)
    parent_id: int | None
    parent_dir: Path | None
    records: list[OutcomeRecord]
    excluded: frozenset[str]
    report: RoundReport
    # Left by the stages, in order.
    pairs: list[Pair] = field(default_factory=list)
    info: dict[str, PairInfo] = field(default_factory=dict)
    dropped_records: dict[str, str] = field(default_factory=dict)
    selected: list[Pair] = field(default_factory=list)
    trained: dict[str, Any] | None = None  # trainer.train.TrainResult, as JSON

    @property
    def funnel(self) -> dict[str, Any]:
        return self.report.funnel

    def save(self, **fields: Any) -> None:
        """Write the report so far (and ``fields``) to the round's row; a dry run has none."""
        if self.report.round_id is None:
            return
        report = self.report
        with self.session_factory() as session:
            round_store.update_round(
                session=session,
                round_id=report.round_id,
                funnel=report.funnel,
                metrics=report.metrics,
                durations=report.durations,
                alarms=report.alarms,
                **fields,
            )


@dataclass(frozen=True)
class Stage:
    """One step of a round. ``compute`` makes the stage's result from what earlier stages left;
    with a ``checkpoint`` file the result (JSON) is kept in the work directory and a resumed
    round loads it instead. ``take`` moves the result into the round and returns an end status
    (``"skipped"``, ``"stopped"``, ``"dry_run"``) to end the round there, or None to go on."""

    name: str
    compute: Callable[[Round], Any]
    take: Callable[[Round, Any], str | None]
    checkpoint: str | None = None
    when: Callable[[Round], bool] = lambda r: True


def run_stage(r: Round, stage: Stage) -> str | None:
    """Load or compute ``stage``'s result (timed into the round's durations), take it into the
    round, and store the funnel so far on the round's row; the stage's end status, if any."""
    path = r.work_dir / stage.checkpoint if stage.checkpoint else None
    if path is not None and path.is_file():
        result = json.loads(path.read_text())
        log.info("event=round_stage_loaded stage=%s file=%s", stage.name, path)
    else:
        with timed(r.report.durations, stage.name):
            result = stage.compute(r)
        if path is not None:
            _save_json(path, result)
    end = stage.take(r, result)
    r.save()
    return end


@contextmanager
def timed(durations: dict[str, float], name: str) -> Iterator[None]:
    """Add the time spent in the block to ``durations[name]``, logging its start and end."""
    started = time.perf_counter()
    log.info("event=round_stage_start stage=%s", name)
    try:
        yield
    finally:
        durations[name] = round(durations.get(name, 0.0) + time.perf_counter() - started, 3)
        log.info("event=round_stage_end stage=%s duration_s=%.1f", name, durations[name])


def _save_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    tmp.rename(path)  # a reader never sees half a file
