"""The round's judge step, inside the pairs stage: measure the judge against the round's sealed
verdicts, and only if it agrees often enough, judge the alternatives nothing executed and make
judge pairs of them (:func:`trainer.pairs.build_judge_pairs`).

Cost: one judge reply per calibration completion (``judge_calibration_items``) and, once the
agreement clears ``judge_min_agreement``, one per alternative (``judge_max_alternatives``) and
one static executability check of each in the sandbox. Every reply is stored
(``judge_verdicts``) with the judge's name and questionnaire version, every check
(``completion_executability``, ``checked_in="sandbox"``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from server.store import signals
from trainer.executability import check_programs
from trainer.judge import Agreement, Judge, JudgeItem, JudgeVerdict, measure_agreement
from trainer.pairs import Alternative, PairBuildResult, build_judge_pairs, normalize_text
from trainer.records import OutcomeRecord, context_key
from trainer.sandbox import Sandbox
from trainer.secrets import SecretScanner

__all__ = [
    "JudgeOptions",
    "calibration_items",
    "judge_round",
    "judge_settings",
    "load_alternatives",
]

log = logging.getLogger(__name__)

_PYTHON = {"python", "py", "python3"}


@dataclass(frozen=True)
class JudgeOptions:
    """The round's judge settings (``KAIZEN_JUDGE_*``, through ``RoundOptions``)."""

    min_agreement: float = 0.75
    min_judged: int = 32
    calibration_items: int = 64
    max_alternatives: int = 256
    max_pairs: int = 64
    pair_weight: float = 0.5
    max_pairs_per_context: int = 4
    seed: int = 0


def _seeded(seed: int, *parts: str) -> str:
    return hashlib.sha256("\0".join((str(seed), *parts)).encode()).hexdigest()


def calibration_items(
    records: Sequence[OutcomeRecord], limit: int, seed: int
) -> list[tuple[OutcomeRecord, bool]]:
    """Up to ``limit`` sealed (record, passed) of distinct texts, picked by a seeded hash; a
    text with both a pass and a failure (flaky) is no verdict to measure against."""
    verdicts: dict[tuple[str, str], set[bool]] = defaultdict(set)
    first: dict[tuple[str, str], OutcomeRecord] = {}
    for r in records:
        if r.endpoint == "chat" or not (r.passed or r.failed):
            continue
        key = (r.context_key, normalize_text(r.final_text))
        verdicts[key].add(r.passed)
        first.setdefault(key, r)
    ranked = sorted(
        (k for k, v in verdicts.items() if len(v) == 1),
        key=lambda k: _seeded(seed, *k),
    )
    return [(first[k], next(iter(verdicts[k]))) for k in ranked[:limit]]


def load_alternatives(session: Session) -> list[Alternative]:
    """Every recorded choice without a CI verdict, as an :class:`Alternative`."""
    out = []
    for completion, choice in signals.choices_without_outcome(session=session):
        params = completion.params or {}
        out.append(
            Alternative(
                completion_id=completion.id,
                choice_index=choice.index,
                context_key=context_key(completion.prompt, completion.suffix),
                endpoint=completion.endpoint,
                prompt=completion.prompt,
                suffix=completion.suffix,
                text=choice.text,
                language=completion.language,
                repository=completion.repository,
                fim_context=str(params.get("fim_context") or ""),
                cut_off=choice.finish_reason == "length",
            )
        )
    return out


def _item(prompt: str, text: str, suffix: str | None, language: str | None) -> JudgeItem:
    return JudgeItem(
        prefix=prompt, completion=text, suffix=suffix or "", language=language or "python"
    )


def _rows(
    keys: Sequence[tuple[str, int, str]], verdicts: Sequence[JudgeVerdict]
) -> list[dict[str, Any]]:
    return [
        {
            "completion_id": cid,
            "choice_index": index,
            "text": text,
            "answers": v.answers,
            "score": v.score,
            "raw": v.raw,
        }
        for (cid, index, text), v in zip(keys, verdicts, strict=True)
    ]


def judge_round(
    *,
    session_factory: sessionmaker[Session],
    records: Sequence[OutcomeRecord],
    judge: Judge,
    options: JudgeOptions,
    sandbox: Sandbox,
    excluded_repositories: Collection[str] = (),
    secret_scanner: SecretScanner | None = None,
) -> tuple[PairBuildResult | None, dict[str, Any]]:
    """Measure ``judge`` on the round's sealed verdicts; if its agreement clears the threshold,
    judge pairs from the alternatives nothing executed. Returns the pairs (None when the judge
    was not used) and the funnel's ``judge`` entry."""
    calibration = calibration_items(records, options.calibration_items, options.seed)
    verdicts = judge.judge(
        [_item(r.prompt, r.final_text, r.suffix, r.language) for r, _ in calibration]
    )
    agreement: Agreement = measure_agreement(verdicts, [passed for _, passed in calibration])
    with session_factory() as session:
        signals.record_judge_verdicts(
            session=session,
            judge_name=judge.name,
            prompt_version=judge.prompt_version,
            rows=_rows(
                [(r.completion_id, r.choice_index, r.final_text) for r, _ in calibration], verdicts
            ),
        )
    used = agreement.clears(options.min_agreement, options.min_judged)
    funnel: dict[str, Any] = {
        "judge": judge.name,
        "prompt_version": judge.prompt_version,
        "agreement": agreement.to_json(),
        "min_agreement": options.min_agreement,
        "min_judged": options.min_judged,
        "used": used,
        "pairs": 0,
    }
    log.info(
        "event=judge_agreement judge=%s judged=%d agreement=%s precision=%s used=%s",
        judge.name,
        agreement.judged,
        agreement.agreement,
        agreement.precision,
        used,
    )
    if not used:
        return None, funnel

    verified = {r.context_key for r in records if r.passed or r.failed}
    with session_factory() as session:
        alternatives = load_alternatives(session)
    # Only contexts with two distinct texts can give a pair, and a verified one never does.
    texts: dict[str, set[str]] = defaultdict(set)
    for a in alternatives:
        texts[a.context_key].add(normalize_text(a.text))
    candidates = [
        a for a in alternatives if len(texts[a.context_key]) > 1 and a.context_key not in verified
    ]
    candidates.sort(key=lambda a: _seeded(options.seed, a.context_key, a.id))
    candidates = sorted(candidates[: options.max_alternatives], key=lambda a: a.id)
    calls = judge.judge([_item(a.prompt, a.text, a.suffix, a.language) for a in candidates])
    python = [
        a
        for a in candidates
        if a.endpoint != "chat" and (a.language is None or a.language.lower() in _PYTHON)
    ]
    checks = check_programs(
        [a.prompt + a.text + (a.suffix or "") for a in python], sandbox=sandbox, run=False
    )
    with session_factory() as session:
        signals.record_judge_verdicts(
            session=session,
            judge_name=judge.name,
            prompt_version=judge.prompt_version,
            rows=_rows([(a.completion_id, a.choice_index, a.text) for a in candidates], calls),
        )
        for a, check in zip(python, checks, strict=True):
            signals.record_executability(
                session=session,
                completion_id=a.completion_id,
                choice_index=a.choice_index,
                text=a.text,
                result=check.to_json(),
                checked_in="sandbox",
            )
    # The sandbox is not the project's environment: its imports say nothing; a file that does
    # not parse, or misuses an API that did import, is not "correct" whatever the judge says.
    runnable = {
        a.id: bool(c.parses and c.api is not False) for a, c in zip(python, checks, strict=True)
    }
    # Where CI checked the text in the project's own environment, that check decides.
    with session_factory() as session:
        ci = signals.executability_checks(
            session=session,
            completion_ids=sorted({a.completion_id for a in candidates}),
            checked_in="ci",
        )
    for a in candidates:
        row = ci.get((a.completion_id, a.choice_index, signals.text_sha256(a.text)))
        if row is not None:
            runnable[a.id] = row.executable
    built = build_judge_pairs(
        candidates,
        {a.id: v for a, v in zip(candidates, calls, strict=True)},
        verified_contexts=verified,
        weight=options.pair_weight,
        max_pairs=options.max_pairs,
        max_pairs_per_context=options.max_pairs_per_context,
        seed=options.seed,
        executable=runnable,
        excluded_repositories=excluded_repositories,
        secret_scanner=secret_scanner,
    )
    funnel.update(
        {
            "alternatives": len(alternatives),
            "alternatives_judged": len(candidates),
            "executability_checked": len(checks),
            "pairs_funnel": built.funnel,
            "pairs": len(built.pairs),
        }
    )
    return built, funnel


def judge_settings(settings: Any) -> dict[str, Any]:
    """``RoundOptions``' judge fields as :class:`server.config.Settings` describes them
    (``KAIZEN_JUDGE_*``); ``bundled`` is the bundled model's prepared directory."""
    model = settings.judge_model
    if model == "bundled":
        from server.model_prep import bundled_model_dir

        model = str(bundled_model_dir(settings.model_cache or settings.home / "models"))
    return {
        "judge_model": model,
        "judge_min_agreement": settings.judge_min_agreement,
        "judge_min_judged": settings.judge_min_judged,
        "judge_calibration_items": settings.judge_calibration_items,
        "judge_max_pairs": settings.judge_max_pairs,
        "judge_pair_weight": settings.judge_pair_weight,
    }
