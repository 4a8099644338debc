"""Packed vs padded DPO batches: real (non-padding) tokens per second of training, same pairs,
same recipe, same seed, alternating runs.

Pairs are built from MBPP+'s train split the way traffic makes them: the task's FIM prompt, the
canonical body as the chosen side and a broken copy of it (an operator flipped, a line dropped)
as the rejected side, so lengths vary as they do in real rounds. Both modes use the trainer's
length-bucketed batches; ``packing`` then concatenates each batch's sequences into rows without
padding (``trainer/packing.py``), while TRL's padded batches pad to the longest sequence.

    .venv/bin/python benchmarks/packing.py --pairs 48 --batch-size 8 --steps 3 --repeats 2

(``--model DIR`` for another checkpoint; the default is the bundled model, prepared if needed.)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from benchmarks.simulate import DEFAULT_DATA, canonical_fixes
from server.config import Settings
from server.engine.vllm_engine import resolve_model_dir
from server.services.fim import FimFormat
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


def run_once(model_dir: Path, pairs: list[Pair], packing: bool, args: argparse.Namespace) -> Any:
    from trainer.train import train_adapter

    config = TrainConfig(
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=0,
        packing=packing,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=10_000,
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="Checkpoint directory (default: the bundled model).")
    p.add_argument("--data", default=os.environ.get("KAIZEN_MBPP_PATH", str(DEFAULT_DATA)))
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)

    model_dir = Path(args.model) if args.model else resolve_model_dir(Settings(_env_file=None))
    pairs = make_pairs(Path(args.data), args.pairs)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for packing in (False, True):  # alternate, so drift in machine load hits both
            result = run_once(model_dir, pairs, packing, args)
            runs.append(
                {
                    "repeat": repeat,
                    "packing": packing,
                    "tokens_per_s": result.tokens_per_s,
                    "padding_ratio": result.metrics.get("padding_ratio"),
                    "steps": result.steps,
                    "loss": result.metrics.get("loss"),
                    "train_runtime_s": result.metrics.get("train_runtime"),
                }
            )
            print(
                f"repeat {repeat} {'packed' if packing else 'padded'}: "
                f"{result.tokens_per_s:.1f} tokens/s, padding {runs[-1]['padding_ratio']:.3f}, "
                f"loss {runs[-1]['loss']}",
                flush=True,
            )

    def mean(packing: bool) -> float:
        values = [r["tokens_per_s"] for r in runs if r["packing"] == packing]
        return sum(values) / len(values)

    padded, packed = mean(False), mean(True)
    print(f"\n{'mode':<8} {'tokens/s':>10}")
    print(f"{'padded':<8} {padded:>10.1f}")
    print(f"{'packed':<8} {packed:>10.1f}")
    print(f"packed / padded: {packed / padded:.2f}x (target >= 1.5x)")
    path = write_results(
        "packing",
        {
            "command": " ".join(sys.argv),
            "model": str(model_dir),
            "pairs": len(pairs),
            "args": vars(args),
            "runs": runs,
            "padded_tokens_per_s": padded,
            "packed_tokens_per_s": packed,
            "ratio": packed / padded,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
