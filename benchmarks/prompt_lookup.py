"""A lever measured and not taken: speculative decoding by prompt lookup on the CPU engine.

llama-cpp-python's ``LlamaPromptLookupDecoding`` drafts tokens from n-grams of the prompt (code
repeats its own context) and verifies them in one batch. This runs the first ``--tasks``
single-line infill tasks greedily through llama.cpp on the bundled GGUF, with and without it,
as the engine runs them (FIM prompt, stop at the newline, ``max_tokens`` 48), and prints the
median time per completion and how many outputs stay the same.

    python benchmarks/prompt_lookup.py --tasks 10

Writes ``benchmarks/results/prompt_lookup-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import percentile, write_results  # noqa: E402
from benchmarks.latency import default_model_cache, load_tasks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--draft-tokens", type=int, default=10)
    args = parser.parse_args(argv)

    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    from transformers import AutoTokenizer

    from server.engine.fim import FIM_END_TOKENS, FimFormat
    from server.engine.llama_engine import eos_token_ids
    from server.model_prep import ensure_bundled_gguf, prepare_bundled_model

    model_dir = prepare_bundled_model(default_model_cache())
    gguf = ensure_bundled_gguf(default_model_cache())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ends = eos_token_ids(model_dir) | {tokenizer.convert_tokens_to_ids(t) for t in FIM_END_TOKENS}
    tasks = load_tasks(args.tasks)
    threads = len(os.sched_getaffinity(0))
    runs: dict[str, dict[str, object]] = {}
    for name, draft in (
        ("plain", None),
        ("prompt lookup", LlamaPromptLookupDecoding(num_pred_tokens=args.draft_tokens)),
    ):
        llama = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            draft_model=draft,
        )
        seconds, texts = [], []
        for task in tasks:
            ids = tokenizer.encode(
                FimFormat().build(task.prefix, task.suffix), add_special_tokens=False
            )
            llama.reset()
            started, out = time.perf_counter(), []
            for token in llama.generate(
                ids, temp=0.0, top_k=0, min_p=0.0, top_p=1.0, repeat_penalty=1.0
            ):
                if token in ends or "\n" in tokenizer.decode([*out, token]) or len(out) >= 48:
                    break
                out.append(token)
            seconds.append(time.perf_counter() - started)
            texts.append(tokenizer.decode(out))
        llama.close()
        runs[name] = {"median_s": percentile(seconds, 50), "seconds": seconds, "texts": texts}
    plain, lookup = runs["plain"]["texts"], runs["prompt lookup"]["texts"]
    same = sum(a == b for a, b in zip(plain, lookup, strict=True))  # type: ignore[call-overload]
    print(f"\n{'decoding':<14} {'median s':>9}")
    for name, run in runs.items():
        print(f"{name:<14} {run['median_s']:>9.2f}")
    print(f"same greedy output: {same}/{len(tasks)}")
    path = write_results(
        "prompt_lookup",
        {"benchmark": "prompt_lookup", "args": vars(args), "runs": runs, "same": same},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
