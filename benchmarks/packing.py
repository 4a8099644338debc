"""Packed vs padded DPO batches: training throughput on the same pairs, same recipe, same seed.

Four batch layouts, alternated within each repeat so that drift in machine load hits all of them:

========  =====================================================================================
trl       TRL's padded batches in TRL's shuffled order (``packing=False, group_by_length=False``)
padded    TRL's padded batches of pairs of similar length (``packing=False``)
packed    rows of separate ``prompt+chosen`` and ``prompt+rejected`` sequences, no padding
          between them (``share_prompt=False``)
shared    packed rows where each pair's prompt is computed once for both sides (the trainer's
          default)
========  =====================================================================================

Throughput is **tokens/s**: prompt and completion tokens of both sides of every pair trained on,
per second of training (a shared prompt counts for each side, as the padded batches hold it), so
every layout is measured by the same count of the same work; pairs/s says the same. "computed"
is the tokens the forward passes ran, padding included, per data token. The default of one
epoch (``--steps`` = pairs / batch size) makes every layout train on exactly the same pairs.

Pairs are built from MBPP+'s train split the way traffic makes them: the task's FIM prompt, the
canonical body as the chosen side and a broken copy of it (an operator flipped, a line dropped)
as the rejected side, so lengths vary as they do in real rounds. ``--pairs-file`` takes a real
round's ``pairs.json`` instead.

    .venv/bin/python benchmarks/packing.py --pairs 24 --batch-size 8 --repeats 2

(``--model DIR`` for another checkpoint; the default is the bundled model, prepared if needed.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit, resolve_model, write_results
from benchmarks.simulate import DEFAULT_DATA, canonical_fixes
from server.engine.fim import FimFormat
from trainer.config import TrainConfig
from trainer.pairs import Pair
from trainer.tasks import load_mbpp

log = logging.getLogger("benchmarks.packing")

_FLIPS = [(" + ", " - "), (" < ", " > "), (" == ", " != "), ("True", "False"), (" and ", " or ")]


def _broken(body: str) -> str:
    for old, new in _FLIPS:
        if old in body:
            return body.replace(old, new, 1)
    lines = body.rstrip("\n").split("\n")
    return "\n".join(lines[:-1] or ["    pass"]) + "\n"


def make_pairs(data: Path, n: int) -> list[Pair]:
    fixes = canonical_fixes(data)
    fim = FimFormat()
    pairs = []
    for task in load_mbpp(data, "train"):
        body = fixes.get(task.task_id)
        if not body or not re.search(r"\S", body):
            continue
        pairs.append(
            Pair(
                id=task.task_id,
                prompt=fim.build(task.prompt, task.suffix),
                chosen=body,
                rejected=_broken(body),
                source="ci",
            )
        )
        if len(pairs) == n:
            break
    return pairs


MODES: dict[str, dict[str, bool]] = {
    "trl": {"packing": False, "group_by_length": False},
    "padded": {"packing": False, "group_by_length": True},
    "packed": {"packing": True, "share_prompt": False},
    "shared": {"packing": True, "share_prompt": True},
}


def load_pairs_file(path: Path, n: int) -> list[Pair]:
    """The first ``n`` pairs of a round's ``pairs.json``."""
    built = json.loads(path.read_text())
    return [Pair(**p) for p in built["pairs"][:n]]


def run_once(model_dir: Path, pairs: list[Pair], mode: str, args: argparse.Namespace) -> Any:
    from trainer.train import train_adapter

    config = TrainConfig(
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=0,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=10_000,
        **MODES[mode],
    )
    with tempfile.TemporaryDirectory(prefix="kaizen-packing-") as out:
        return train_adapter(
            base_model_dir=model_dir,
            pairs=pairs,
            config=config,
            output_dir=Path(out),
            progress=False,
            resume=False,
        )


def token_stats(model_dir: Path, pairs: list[Pair]) -> dict[str, float]:
    """Mean prompt and completion lengths in tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def mean_tokens(texts: list[str]) -> float:
        return sum(len(tokenizer(t)["input_ids"]) for t in texts) / len(texts)

    return {
        "prompt": mean_tokens([p.prompt for p in pairs]),
        "chosen": mean_tokens([p.chosen for p in pairs]),
        "rejected": mean_tokens([p.rejected for p in pairs]),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="Checkpoint directory (default: the bundled model).")
    p.add_argument("--data", default=os.environ.get("KAIZEN_MBPP_PATH", str(DEFAULT_DATA)))
    p.add_argument("--pairs-file", help="A round's pairs.json to train on instead of MBPP+.")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, help="Optimiser steps (default: one epoch).")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated of {list(MODES)}.")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="Keep activations (faster, much more memory; the trainer's default recomputes).",
    )
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")

    model_dir = resolve_model(args.model).path
    if args.pairs_file:
        pairs = load_pairs_file(Path(args.pairs_file), args.pairs)
    else:
        pairs = make_pairs(Path(args.data), args.pairs)
    if args.steps is None:
        args.steps = max(1, len(pairs) // args.batch_size)
    stats = token_stats(model_dir, pairs)
    print(
        f"{len(pairs)} pairs; mean tokens: prompt {stats['prompt']:.0f}, "
        f"chosen {stats['chosen']:.0f}, rejected {stats['rejected']:.0f}; "
        f"{args.steps} steps of {args.batch_size}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for mode in modes:
            result = run_once(model_dir, pairs, mode, args)
            metrics = result.metrics
            runtime = float(metrics.get("train_runtime") or 0.0)
            pairs_trained = args.steps * args.batch_size
            runs.append(
                {
                    "repeat": repeat,
                    "mode": mode,
                    "config": MODES[mode],
                    "tokens_per_s": result.tokens_per_s,
                    "pairs_per_s": pairs_trained / runtime if runtime else None,
                    "padding_ratio": metrics.get("padding_ratio"),
                    "computed_per_data_token": metrics.get("computed_per_data_token"),
                    "steps": result.steps,
                    "loss": metrics.get("loss"),
                    "train_runtime_s": runtime,
                }
            )
            print(
                f"repeat {repeat} {mode:<7} {result.tokens_per_s:7.1f} tokens/s, "
                f"padding {runs[-1]['padding_ratio']:.3f}, loss {runs[-1]['loss']}",
                flush=True,
            )

    def mean(mode: str, key: str) -> float:
        values = [r[key] for r in runs if r["mode"] == mode and r[key] is not None]
        return sum(values) / len(values)

    summary = {
        mode: {
            "tokens_per_s": mean(mode, "tokens_per_s"),
            "pairs_per_s": mean(mode, "pairs_per_s"),
            "padding_ratio": mean(mode, "padding_ratio"),
            "computed_per_data_token": mean(mode, "computed_per_data_token"),
        }
        for mode in modes
    }
    for mode in modes:
        for base in ("trl", "padded"):
            if base in summary:
                summary[mode][f"vs_{base}"] = (
                    summary[mode]["tokens_per_s"] / summary[base]["tokens_per_s"]
                )
    print(
        f"\n{'mode':<8} {'tokens/s':>9} {'pairs/s':>8} {'padding':>8} {'computed':>9} "
        f"{'vs trl':>7} {'vs padded':>10}"
    )
    for mode, row in summary.items():
        print(
            f"{mode:<8} {row['tokens_per_s']:>9.1f} {row['pairs_per_s']:>8.3f} "
            f"{row['padding_ratio']:>8.3f} {row['computed_per_data_token']:>9.3f} "
            f"{row.get('vs_trl', float('nan')):>6.2f}x {row.get('vs_padded', float('nan')):>9.2f}x"
        )
    print("target: the trainer's default (shared) >= 1.5x padded")
    path = write_results(
        "packing",
        {
            "command": " ".join(sys.argv),
            "commit": git_commit(),
            "model": str(model_dir),
            "pairs": len(pairs),
            "mean_tokens": stats,
            "args": vars(args),
            "runs": runs,
            "summary": summary,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
