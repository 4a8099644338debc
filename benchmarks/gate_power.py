"""The gate's and the canary's error rates, by simulation through their own code.

The gate part runs :func:`trainer.gate.judge` (the rule :func:`trainer.gate.run_gate` decides
with) on synthetic per-task outcomes, with the real task ids of the configured suites (so
HumanEval and its infill are clustered exactly as in a real run) and the configured samples per
task. The canary part runs :func:`server.services.canary.decide` (what the server's canary judge
calls at every poll) on synthetic streams of acceptances and CI verdicts.

The synthetic model, per simulated install: each problem has a latent ability
``theta ~ N(0, 2)`` of the baseline (pass probability ``sigmoid(theta)``; an infill variant adds
``N(0, 1)`` of its own); a candidate adds ``shift + tau * N(0, 1)`` per problem, ``shift`` set so
that its mean pass probability over problems gains exactly the stated points. ``tau`` is how much
the two models disagree beyond that gain (0.5, 1, 1.5: at +5 points 9%, 15%, 21% of greedy
answers flip; the pilot round in NOTES.md flipped 13-14%, so ``tau = 1`` is the realistic
case). The suites are fixed for an install (the same problems every round); every round is a
new candidate with fresh samples.

Printed: false approval (no true gain) in one round and in any of ``--rounds`` rounds, power at
+2/+5/+8 points, and the canary's promotion rates at -5/0/+5 points. ``--json`` writes them.

    .venv/bin/python -m benchmarks.gate_power                  # the defaults
    .venv/bin/python -m benchmarks.gate_power --recorded 40    # an install with 40 recorded
    .venv/bin/python -m benchmarks.gate_power --database-url sqlite:///~/.kaizen/kaizen.db
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.services.canary import CanaryConfig, MetricCounts
from server.services.canary import decide as canary_decide
from trainer.gate import RECORDED, GateConfig, SuiteScores, judge
from trainer.tasks import load_humaneval, load_humaneval_single_line, load_mbpp, problem_id

GAINS = (2.0, 5.0, 8.0)
TAUS = (0.5, 1.0, 1.5)
THETA_SD = 2.0
VARIANT_SD = 1.0

# -- the gate ---------------------------------------------------------------------------------


def suite_ids(sizes: Mapping[str, int]) -> dict[str, tuple[str, ...]]:
    """The task ids the gate would use: the real ones for public suites (the first ``n`` of
    each, all of them for -1), synthetic ones for ``recorded``."""
    real = {
        "mbpp_dev": lambda: [t.task_id for t in load_mbpp(split="dev")],
        "humaneval": lambda: [t.task_id for t in load_humaneval()],
        "humaneval_fim": lambda: [t.task_id for t in load_humaneval_single_line()],
    }
    ids: dict[str, tuple[str, ...]] = {}
    for name, n in sizes.items():
        if name == RECORDED:
            ids[name] = tuple(f"recorded/{i:04d}" for i in range(n))
        else:
            every = real[name]()
            ids[name] = tuple(every if n < 0 else every[:n])
    return ids


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-x))


def _shift_for(gain: float, tau: float, greedy: bool) -> float:
    """The mean logit shift that makes the candidate's population pass rate ``gain`` points
    higher (bisection on a fixed reference sample)."""
    rng = np.random.default_rng(12345)
    theta = rng.normal(0, THETA_SD, 200_000)
    eps = rng.normal(0, 1, theta.size)

    def rate(x: NDArray[np.float64]) -> float:
        return float(np.mean(x > 0) if greedy else np.mean(_sigmoid(x)))

    base = rate(theta)
    low, high = -5.0, 5.0
    for _ in range(60):
        mid = (low + high) / 2
        if rate(theta + mid + tau * eps) - base < gain / 100:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass
class Install:
    """Fixed latent abilities of an install's suites (shape: sims x rows per suite)."""

    ids: dict[str, tuple[str, ...]]
    theta: dict[str, NDArray[np.float64]]
    problems: dict[str, NDArray[np.int64]]  # row -> problem number across all suites
    count: int


def make_install(ids: Mapping[str, Sequence[str]], sims: int, rng: np.random.Generator) -> Install:
    numbers: dict[str, int] = {}
    problems = {
        name: np.array([numbers.setdefault(problem_id(t), len(numbers)) for t in ts])
        for name, ts in ids.items()
    }
    problem_theta = rng.normal(0, THETA_SD, (sims, len(numbers)))
    theta = {}
    for name, index in problems.items():
        own = np.array([t != problem_id(t) for t in ids[name]])  # an infill variant
        theta[name] = problem_theta[:, index] + own * rng.normal(0, VARIANT_SD, (sims, len(index)))
    return Install({k: tuple(v) for k, v in ids.items()}, theta, problems, len(numbers))


def simulate_gate_round(
    install: Install,
    config: GateConfig,
    *,
    gain: float,
    tau: float,
    rng: np.random.Generator,
) -> NDArray[np.bool_]:
    """One gating round for every simulated install: a new candidate, fresh samples."""
    greedy = config.samples == 1 and config.temperature == 0
    shift = _shift_for(gain, tau, greedy)
    sims = next(iter(install.theta.values())).shape[0]
    change = shift + tau * rng.normal(0, 1, (sims, install.count))  # per problem
    scores = {}
    for name, theta in install.theta.items():
        cand = theta + change[:, install.problems[name]]
        if greedy:
            base_s, cand_s = (theta > 0).astype(float), (cand > 0).astype(float)
        else:
            k = config.samples
            base_s = rng.binomial(k, _sigmoid(theta)) / k
            cand_s = rng.binomial(k, _sigmoid(cand)) / k
        scores[name] = SuiteScores(install.ids[name], base_s, cand_s)
    return np.asarray(judge(scores, config).approved, dtype=bool)


def gate_table(
    sizes: Mapping[str, int], config: GateConfig, *, sims: int, rounds: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ids = suite_ids(sizes)
    out: dict[str, Any] = {"sizes": {k: len(v) for k, v in ids.items()}, "by_tau": {}}
    for tau in TAUS:
        install = make_install(ids, sims, rng)
        any_approved = np.zeros(sims, dtype=bool)
        per_round = []
        for _ in range(rounds):
            approved = simulate_gate_round(install, config, gain=0.0, tau=tau, rng=rng)
            per_round.append(float(approved.mean()))
            any_approved |= approved
        row = {
            "false_approval_per_round": float(np.mean(per_round)),
            f"false_approval_{rounds}_rounds": float(any_approved.mean()),
        }
        for gain in GAINS:
            approved = simulate_gate_round(install, config, gain=gain, tau=tau, rng=rng)
            row[f"power_+{gain:g}"] = float(approved.mean())
        out["by_tau"][f"{tau:g}"] = row
    return out


# -- the canary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """How completions and verdicts arrive (defaults: a busy team with a 10% canary)."""

    canary_share: float = 0.1
    per_hour: float = 300.0  # completions shown per hour, all versions
    acceptance: float = 0.30  # the active version's
    ci_share: float = 0.4  # shown completions that get a CI verdict
    ci_pass: float = 0.70  # the active version's (developer fixes excluded)
    fix_share: float = 0.15  # verdicts that are a developer's fix (excluded)


def simulate_canary(
    config: CanaryConfig,
    traffic: Traffic,
    *,
    delta_points: float,
    sims: int,
    seed: int,
    poll_minutes: float = 10.0,
) -> dict[str, float]:
    """Promotion and rollback rates, and hours to a decision, of canaries whose acceptance and
    CI pass rates are both ``delta_points`` off the active version's."""
    rng = np.random.default_rng(seed)
    d = delta_points / 100
    step_h = poll_minutes / 60
    looks = int(np.ceil(config.max_hours / step_h))
    counts = np.zeros((sims, 8))  # canary/active x shown, accepted, judged, passed
    decided = np.zeros(sims, dtype=object)
    decided[:] = ""
    hours = np.full(sims, np.nan)
    rates = {
        "canary": (traffic.acceptance + d, traffic.ci_pass + d, traffic.canary_share),
        "active": (traffic.acceptance, traffic.ci_pass, 1 - traffic.canary_share),
    }
    for look in range(1, looks + 1):
        for j, (accept, ci_pass, share) in enumerate(rates.values()):
            shown = rng.poisson(traffic.per_hour * share * step_h, sims)
            judged = rng.binomial(shown, traffic.ci_share * (1 - traffic.fix_share))
            counts[:, 4 * j + 0] += shown
            counts[:, 4 * j + 1] += rng.binomial(shown, accept)
            counts[:, 4 * j + 2] += judged
            counts[:, 4 * j + 3] += rng.binomial(judged, ci_pass)
        open_ = decided == ""
        if not open_.any():
            break
        elapsed = look * step_h
        c = counts[open_]
        result = canary_decide(
            {
                "acceptance": MetricCounts(c[:, 1], c[:, 0], c[:, 5], c[:, 4]),
                "ci_pass": MetricCounts(c[:, 3], c[:, 2], c[:, 7], c[:, 6]),
            },
            config,
            hours=elapsed,
        )
        action = np.broadcast_to(np.asarray(result.action, dtype=object), (int(open_.sum()),))
        idx = np.flatnonzero(open_)
        done = action != "wait"
        decided[idx[done]] = action[done]
        hours[idx[done]] = elapsed
    return {
        "promoted": float(np.mean(decided == "promote")),
        "rolled_back": float(np.mean(decided == "rollback")),
        "median_hours": float(np.nanmedian(hours)),
    }


def canary_table(
    config: CanaryConfig, traffic: Traffic, *, sims: int, seed: int
) -> dict[str, dict[str, float]]:
    return {
        f"{delta:+g}": simulate_canary(config, traffic, delta_points=delta, sims=sims, seed=seed)
        for delta in (-5.0, 0.0, 5.0)
    }


# -- the command ------------------------------------------------------------------------------


def recorded_count(database_url: str) -> int:
    """How many recorded tasks the gate would hold out on this install (all of them: a
    candidate trains on some, so its real count is at most this)."""
    from server.store.db import make_engine, make_session_factory
    from trainer.gate import recorded_tasks
    from trainer.records import load_outcome_records

    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        return len(recorded_tasks(load_outcome_records(session=session), exclude_record_ids=set()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sims", type=int, default=2000, help="Simulated installs per cell.")
    p.add_argument("--rounds", type=int, default=10, help="Gating rounds for false approval.")
    p.add_argument("--recorded", type=int, default=0, help="Recorded tasks (default: none).")
    p.add_argument("--database-url", help="Count the recorded tasks of this install instead.")
    p.add_argument("--mbpp-dev", type=int, default=-1, help="Tasks (-1: all 60).")
    p.add_argument("--humaneval", type=int, default=-1, help="Tasks, also infills (-1: 164).")
    p.add_argument("--samples", type=int, default=GateConfig().samples)
    p.add_argument("--temperature", type=float, default=GateConfig().temperature)
    p.add_argument("--family-alpha", type=float, default=GateConfig().family_alpha)
    p.add_argument("--ni-points", type=float, default=GateConfig().ni_points)
    p.add_argument("--canary-sims", type=int, default=2000)
    p.add_argument("--per-hour", type=float, default=Traffic.per_hour, help="Shown per hour.")
    p.add_argument("--canary-share", type=float, default=Traffic.canary_share)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="Write the results here.")
    args = p.parse_args(argv)

    recorded = recorded_count(args.database_url) if args.database_url else args.recorded
    sizes = {"mbpp_dev": args.mbpp_dev, "humaneval": args.humaneval}
    sizes["humaneval_fim"] = args.humaneval
    if recorded:
        sizes = {RECORDED: recorded, **sizes}
    config = GateConfig(
        samples=args.samples,
        temperature=args.temperature,
        family_alpha=args.family_alpha,
        ni_points=args.ni_points,
    )
    gate = gate_table(sizes, config, sims=args.sims, rounds=args.rounds, seed=args.seed)
    canary_config = CanaryConfig()
    traffic = Traffic(canary_share=args.canary_share, per_hour=args.per_hour)
    canary = canary_table(canary_config, traffic, sims=args.canary_sims, seed=args.seed)

    print(f"gate: {gate['sizes']}, samples={config.samples}, temperature={config.temperature}")
    print(
        f"  alpha={config.alpha:g} per round (family {config.family_alpha:g} over "
        f"{config.rounds}), margin {config.margin_points:g}, non-inferiority "
        f"-{config.ni_points:g} at {config.ni_alpha:g}; {args.sims} installs per cell"
    )
    rounds_key = f"false_approval_{args.rounds}_rounds"
    print(
        f"  {'tau':>4} {'FA/round':>9} {'FA/' + str(args.rounds):>7} "
        + " ".join(f"{'power+' + format(g, 'g'):>8}" for g in GAINS)
    )
    for tau, row in gate["by_tau"].items():
        print(
            f"  {tau:>4} {row['false_approval_per_round']:>9.3f} {row[rounds_key]:>7.3f} "
            + " ".join(f"{row[f'power_+{g:g}']:>8.3f}" for g in GAINS)
        )
    print(f"canary: {asdict(canary_config)}")
    print(f"  traffic: {asdict(traffic)}; {args.canary_sims} canaries per cell")
    print(f"  {'delta':>6} {'promoted':>9} {'rolled back':>12} {'median h':>9}")
    for delta, row in canary.items():
        print(
            f"  {delta:>6} {row['promoted']:>9.3f} {row['rolled_back']:>12.3f} "
            f"{row['median_hours']:>9.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "gate": {**gate, "config": {**asdict(config), "alpha": config.alpha}},
                    "canary": {
                        "rates": canary,
                        "config": asdict(canary_config),
                        "traffic": asdict(traffic),
                    },
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
