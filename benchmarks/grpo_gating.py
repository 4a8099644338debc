"""Gated vs ungated process reward in GRPO: what Posterior-GRPO warns about, on this model.

Two GRPO runs from the same base, seed and tasks, differing only in the reward rule
(:mod:`trainer.rewards`):

========  ========================================================================
gated     R = format + outcome + 1[outcome] * process   (the trainer's default)
ungated   R = format + outcome + process                 (exists only for this comparison)
========  ========================================================================

``outcome`` is the sandbox's sealed verdict on the task's asserts; ``process`` the judge's score
(:class:`trainer.judge.TransformersJudge`, the share of "yes" to its questionnaire). Per step it
prints and stores the mean reward, the sealed pass rate of the sampled completions, the format
rate and the judge's mean score on the completions it was asked about (gated: the passing ones
only; ungated: all). The finding to look for: ungated, reward can rise while the pass rate does
not (the judge is being pleased); gated, reward moves only with passes.

On a CPU (a reduced run, ~20 minutes on 2 cores with the bundled model as policy and judge)::

    .venv/bin/python benchmarks/grpo_gating.py --steps 6 --tasks 6 --group-size 4 \\
        --max-completion-length 64

On a GPU host, the same command with larger flags (and ``--judge-model`` a larger coder)::

    .venv/bin/python benchmarks/grpo_gating.py --steps 100 --tasks 200 --group-size 8 \\
        --tasks-per-step 4 --max-completion-length 256 --judge-model /models/qwen2.5-coder-7b

Results go to ``benchmarks/results/grpo_gating-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit, resolve_model, write_results

log = logging.getLogger("benchmarks.grpo_gating")

MODES = ("gated", "ungated")
# The columns of each step, as the trainer logs them (trainer.grpo.SealedReward, TRL).
COLUMNS = {
    "reward": "reward",
    "pass": "outcome/pass_rate",
    "format": "format/rate",
    "judge": "process/mean",
    "judged": "process/judged",
    "seconds": "step_time",  # TRL's: generation, sandbox, judge and the update
}


def _config(args: argparse.Namespace, gated: bool) -> Any:
    from trainer.config import TrainConfig

    return TrainConfig(
        method="grpo",
        max_steps=args.steps,
        warmup_steps=0,
        learning_rate=args.lr,
        lora_r=16,
        lora_alpha=32,
        max_length=args.max_length,
        gradient_checkpointing=False,
        save_steps=10_000,  # a benchmark run is not resumed
        seed=args.seed,
        grpo_num_generations=args.group_size,
        grpo_tasks_per_step=args.tasks_per_step,
        grpo_max_completion_length=args.max_completion_length,
        grpo_temperature=args.temperature,
        grpo_gated=gated,
        grpo_suite=args.suite,
        grpo_max_tasks=args.tasks,
    )


def _steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for entry in history:
        if "reward" not in entry:
            continue
        row: dict[str, Any] = {"step": int(entry["step"])}
        for name, key in COLUMNS.items():
            value = entry.get(key)
            row[name] = None if value is None else float(value)
        rows.append(row)
    return rows


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def _seconds(value: float | None) -> str:
    return f"{'-':>6}" if value is None else f"{value:>6.0f}"


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Per step, for each mode: mean reward, sealed pass rate, judge's mean score, seconds."""
    modes = list(runs)
    head = "step  " + "  ".join(
        f"{m + ' reward':>14} {'pass':>6} {'judge':>6} {'s':>6}" for m in modes
    )
    lines = [head, "-" * len(head)]
    steps = sorted({row["step"] for rows in runs.values() for row in rows})
    for step in steps:
        cells = []
        for mode in modes:
            row = next((r for r in runs[mode] if r["step"] == step), {})
            cells.append(
                f"{_fmt(row.get('reward'), 14)} {_fmt(row.get('pass'))} "
                f"{_fmt(row.get('judge'))} {_seconds(row.get('seconds'))}"
            )
        lines.append(f"{step:>4}  " + "  ".join(cells))
    means = []
    for mode in modes:
        rows = runs[mode]
        means.append(
            f"{_fmt(_mean([r['reward'] for r in rows]), 14)} "
            f"{_fmt(_mean([r['pass'] for r in rows]))} {_fmt(_mean([r['judge'] for r in rows]))} "
            f"{_seconds(_mean([r.get('seconds') for r in rows]))}"
        )
    lines.append("mean  " + "  ".join(means))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="Policy checkpoint (default: the bundled model).")
    p.add_argument("--judge-model", help="Judge checkpoint (default: the policy's).")
    p.add_argument("--suite", default="mbpp_train", help="Tasks (trainer.evaluate.SUITES).")
    p.add_argument("--tasks", type=int, default=6, help="Tasks of the suite, in its order.")
    p.add_argument("--steps", type=int, default=6, help="Optimiser steps per mode.")
    p.add_argument("--group-size", type=int, default=4, help="Completions per task.")
    p.add_argument("--tasks-per-step", type=int, default=1)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--judge-max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated of {list(MODES)}.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). One is faster on a CPU others share: "
        "OpenMP's spinning threads slow a step several-fold when the cores are busy.",
    )
    p.add_argument("--no-write", action="store_true", help="Print only; write no results file.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("trainer.train").setLevel(logging.INFO)  # a line per step: progress
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}; use {list(MODES)}")

    import torch

    from trainer.evaluate import load_suite
    from trainer.grpo import train_grpo_adapter
    from trainer.judge import TransformersJudge
    from trainer.sandbox import Sandbox
    from trainer.tasks import mbpp_path

    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="kaizen-grpo-gating-"))
    model = resolve_model(args.model, scratch=scratch)
    judge_dir = Path(args.judge_model) if args.judge_model else model.path
    judge = TransformersJudge(judge_dir, max_new_tokens=args.judge_max_new_tokens)
    tasks = load_suite(args.suite, mbpp_path=mbpp_path(os.environ.get("KAIZEN_MBPP_PATH")))
    tasks = tasks[: args.tasks] if args.tasks else tasks
    sandbox = Sandbox(workers=2)

    runs: dict[str, list[dict[str, Any]]] = {}
    details: dict[str, Any] = {}
    for mode in modes:
        started = time.perf_counter()
        result = train_grpo_adapter(
            base_model_dir=model.path,
            tasks=tasks,
            config=_config(args, gated=mode == "gated"),
            judge=judge,
            output_dir=scratch / mode,
            sandbox=sandbox,
            progress=False,
        )
        runs[mode] = _steps(result.log_history)
        details[mode] = {
            "duration_s": round(time.perf_counter() - started, 1),
            "stopped_reason": result.stopped_reason,
            "steps": result.steps,
            "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
        }
        print(f"{mode}: {result.steps} steps in {details[mode]['duration_s']} s", flush=True)

    print()
    print(table(runs))
    payload = {
        "benchmark": "grpo_gating",
        "commit": git_commit(),
        "command": " ".join(
            ["benchmarks/grpo_gating.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": vars(args),
        "model": str(model.path),
        "judge": {
            "dir": str(judge_dir),
            "name": judge.name,
            "prompt_version": judge.prompt_version,
        },
        "device": "cuda"
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "task_ids": [t.task_id for t in tasks],
        "runs": runs,
        "details": details,
    }
    if not args.no_write:
        print(f"\nresults: {write_results('grpo_gating', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
