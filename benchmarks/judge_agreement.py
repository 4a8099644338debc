"""How often does the judge agree with sealed execution verdicts? The number that decides
whether a round may use judge pairs (``KAIZEN_JUDGE_MIN_AGREEMENT``).

MBPP+ tasks (a seeded subset of ``--suite``), ``--samples`` completions each from the policy
model (vLLM, the trainer's own generator, as a round resamples), each sealed by the sandbox
against the task's asserts, checked for executability (the plugin's check, in the sandbox), and
judged by the judge model (:class:`trainer.judge.TransformersJudge`, the bundled model unless
``--judge-model`` names a local Hugging Face directory). Prints the agreement, the precision of
"correct" against pass, the always-the-commoner-verdict baseline, the parse rate and the answer
distribution per question, and writes JSON to ``benchmarks/results/judge_agreement-<UTC>.json``.

    .venv/bin/python benchmarks/judge_agreement.py [--tasks 16] [--samples 4]

Measured with the defaults (16 mbpp_dev tasks x 4 samples at temperature 0.8, the bundled
Qwen2.5-Coder-0.5B-Instruct as policy and as judge, 2 CPU cores shared with other jobs: about
35 minutes, 15 of them generating and 19 judging): sealed pass rate 0.391, executability rate
0.875, every reply parsed, and the judge answered yes to all three questions for all 64
completions, so its agreement is 0.391 (= the pass rate), below the always-fail baseline of
0.609 and far below the 0.75 threshold: judge pairs stay off. ``--tasks 8`` halves the time.
The same command runs unchanged on a GPU host (``--judge-model`` a larger local coder).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit, write_results  # noqa: E402
from server.config import Settings  # noqa: E402
from server.model_prep import bundled_model_dir  # noqa: E402
from trainer.evaluate import load_suite  # noqa: E402
from trainer.executability import check_programs  # noqa: E402
from trainer.generate import GenerationRequest, vllm_generator_factory  # noqa: E402
from trainer.judge import (  # noqa: E402
    PROMPT_VERSION,
    QUESTIONS,
    JudgeItem,
    TransformersJudge,
    measure_agreement,
)
from trainer.sandbox import Sandbox  # noqa: E402
from trainer.tasks import mbpp_path  # noqa: E402

log = logging.getLogger("benchmarks.judge_agreement")


def _subset(tasks: list[Any], n: int, seed: int) -> list[Any]:
    ranked = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}\0{t.task_id}".encode()).digest())
    return ranked[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="mbpp_dev")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--policy-model", type=Path, default=None, help="default: bundled")
    parser.add_argument("--judge-model", type=Path, default=None, help="default: bundled")
    parser.add_argument("--judge-batch", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="default: the setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    settings = Settings()
    bundled = bundled_model_dir(settings.model_cache or settings.home / "models")
    policy_dir = args.policy_model or bundled
    judge_dir = args.judge_model or bundled
    threshold = args.threshold if args.threshold is not None else settings.judge_min_agreement
    started = time.perf_counter()

    tasks = _subset(load_suite(args.suite, mbpp_path=mbpp_path()), args.tasks, args.seed)
    requests = [GenerationRequest(t.prompt, t.suffix, t.single_line) for t in tasks]
    with vllm_generator_factory(settings, policy_dir)() as generator:
        samples = generator.generate(
            requests,
            n=args.samples,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=args.seed,
            progress=True,
        )
    generated_s = time.perf_counter() - started

    rows = [(t, text) for t, texts in zip(tasks, samples, strict=True) for text in texts]
    sandbox = Sandbox(workers=2)
    runs = sandbox.run_tests([(t.program(c), t.test) for t, c in rows], progress=True)
    passed = [r.passed for r in runs]
    executable = [
        e.executable for e in check_programs([t.program(c) for t, c in rows], sandbox=sandbox)
    ]
    sealed_s = time.perf_counter() - started - generated_s

    judge = TransformersJudge(judge_dir, batch_size=args.judge_batch, progress=True)
    verdicts = judge.judge([JudgeItem(t.prompt, c, t.suffix) for t, c in rows])
    judged_s = time.perf_counter() - started - generated_s - sealed_s
    agreement = measure_agreement(verdicts, passed)
    # The "runs" question against the executability check, where both are known.
    runs_pairs = [
        (v.answers["runs"], e)
        for v, e in zip(verdicts, executable, strict=True)
        if v.answers["runs"] is not None
    ]
    answers = {
        key: dict(
            Counter({True: "yes", False: "no", None: "unparsed"}[v.answers[key]] for v in verdicts)
        )
        for key in QUESTIONS
    }

    payload = {
        "command": " ".join(["benchmarks/judge_agreement.py", *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "suite": args.suite,
        "tasks": len(tasks),
        "samples_per_task": args.samples,
        "completions": len(rows),
        "policy_model": str(policy_dir),
        "judge": {"name": judge.name, "prompt_version": PROMPT_VERSION, "dir": str(judge_dir)},
        "pass_rate": sum(passed) / len(rows) if rows else None,
        "executability_rate": sum(executable) / len(rows) if rows else None,
        "agreement": agreement.to_json(),
        "threshold": threshold,
        "judge_pairs_allowed": agreement.clears(threshold, settings.judge_min_judged),
        "runs_vs_executability": {
            "compared": len(runs_pairs),
            "agreed": sum(a == e for a, e in runs_pairs),
        },
        "answers": answers,
        "durations_s": {
            "generate": round(generated_s, 1),
            "sandbox": round(sealed_s, 1),
            "judge": round(judged_s, 1),
        },
        "items": [
            {
                "task_id": t.task_id,
                "completion": c,
                "passed": p,
                "executable": e,
                "answers": v.answers,
                "raw": v.raw,
            }
            for (t, c), p, e, v in zip(rows, passed, executable, verdicts, strict=True)
        ],
    }
    path = write_results("judge_agreement", payload)
    a = agreement.to_json()
    print(f"\njudge {judge.name} ({PROMPT_VERSION}) vs sealed verdicts on {args.suite}")
    print(f"{'completions':<28}{len(rows):>8}")
    print(f"{'sealed pass rate':<28}{payload['pass_rate']:>8.3f}")
    print(f"{'executability rate':<28}{payload['executability_rate']:>8.3f}")
    print(f"{'judge calls parsed':<28}{a['parsed']:>8}")
    print(f"{'agreement':<28}{a['agreement']:>8.3f}")
    print(f"{'majority baseline':<28}{a['majority']:>8.3f}")
    precision = "-" if a["precision"] is None else f"{a['precision']:.3f}"
    print(f"{'precision (correct->pass)':<28}{precision:>8}")
    print(f"{'threshold':<28}{threshold:>8.3f}")
    print(f"{'judge pairs allowed':<28}{str(payload['judge_pairs_allowed']):>8}")
    for key, counts in answers.items():
        print(f"  {key:<26}{counts}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
