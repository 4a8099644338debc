"""Serving overhead: Kaizen against plain ``vllm serve``, same model, engine settings and prompts.

Reproduce (the bundled model; about 10 minutes on 2 CPU cores, nothing else running):

    .venv/bin/python benchmarks/serving.py --model bundled --rounds 3 --concurrency 8 --requests 64

A quick end-to-end check with a tiny random model the tests build (``--model tiny``):

    .venv/bin/python benchmarks/serving.py --model tiny --rounds 1 --requests 16

What it does, per round (``--rounds``, default 2), one server at a time (never both: they would
share the cores): start plain ``vllm serve``, warm it up, drive ``--requests`` streaming
fill-in-the-middle completions through ``--concurrency`` concurrent clients, stop it (SIGTERM);
then the same for Kaizen (``kaizen db upgrade``, ``kaizen tokens create``, ``kaizen serve``, a
fresh SQLite database per run). So the order is raw, kaizen, raw, kaizen, ...

Same work for both:

* Prompts: MBPP+ tasks (``--data``), ``prompt`` + ``canonical_solution`` split at a line boundary
  inside the function body (seeded) into prefix and suffix. Kaizen gets
  ``{"prompt": prefix, "suffix": suffix}``; ``vllm serve`` (which refuses ``suffix``) gets the
  pre-built ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`` plus the stop strings
  (``server.engine.fim.suffix_stops``) and stop token ids (``FIM_END_TOKENS``) Kaizen computes.
  Temperature 0, the same ``max_tokens``; ``vllm serve`` runs with ``--generation-config vllm``
  because Kaizen does not apply the checkpoint's ``generation_config.json`` sampling defaults.
* Engine: same model directory, served name, dtype, max_model_len, LoRA enabled with the same
  max_loras / max_lora_rank / max_cpu_loras, KV cache (``VLLM_CPU_KVCACHE_SPACE`` and the same
  ``kv_cache_memory_bytes``), enforce-eager, seed, memory utilisation, log stats off. Both
  servers' logs print vLLM's resolved engine config; the results say whether they match.

Measured per request: TTFT (send to the first SSE chunk with non-empty text), total latency,
output tokens (the final ``usage`` chunk, ``stream_options.include_usage``), errors (must be 0).
Throughput: total output tokens / wall time of the load phase. Reported per round and pooled,
with the ratios Kaizen/raw and the targets (p50 TTFT ratio <= 1.03, throughput ratio >= 0.97,
every Kaizen request recorded in its ``completions`` table, counted after a graceful stop).
Results go to ``benchmarks/results/serving-<UTC timestamp>.json``; server logs to a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    LOOPBACK,
    RESULTS_DIR,
    ServerProcess,
    git_commit,
    kaizen_command,
    percentile,
    port_is_free,
    raise_keyboard_interrupt,
    ratio,
    resolve_model,
    run_kaizen,
    server_env,
    stream_completion,
    write_results,
)

DEFAULT_DATA = None  # the MBPP+ copy bundled in trainer/data/ (trainer.tasks.mbpp_path)
TARGET_TTFT_P50_RATIO = 1.03
TARGET_THROUGHPUT_RATIO = 0.97
SERVERS = ("raw", "kaizen")

# `vllm serve` as the `vllm` console script runs it. vllm-cpu is installed as the distribution
# "vllm-cpu", and the CLI asks importlib.metadata for "vllm" (its --version), which fails; this
# shim answers that query the way vLLM's own platform detection does and then runs the CLI.
_VLLM_CLI_SHIM = """
import importlib.metadata as m, sys
_version = m.version
def version(name):
    try:
        return _version(name)
    except m.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise
m.version = version
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


# ------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class FimCase:
    task_id: str
    prefix: str
    suffix: str
    stops: tuple[str, ...]

    def fim_prompt(self) -> str:
        from server.engine.fim import FimFormat

        return FimFormat().build(self.prefix, self.suffix)


def split_code(
    code: str, entry_point: str, rng: random.Random, hole_lines: int = 1
) -> tuple[str, str]:
    """Split ``code`` at line boundaries inside ``entry_point``'s body into prefix and suffix.

    The cut is drawn (from ``rng``) from the middle half of the body; ``hole_lines`` body lines
    after it are left out (the "middle" the model fills in; 0: a plain split). The prefix ends
    with a newline and holds at least the ``def`` line. The suffix is never empty (at least the
    file's final newline), so Kaizen always treats the request as fill-in-the-middle.
    """
    lines = code.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(")
    starts = [i for i, line in enumerate(lines) if pattern.match(line)]
    if not starts:
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ")]
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if not nonblank:
        raise ValueError("empty code")
    last = nonblank[-1]
    if starts and starts[-1] < last:
        # Multi-line signatures: the body starts after the line that ends with ':'.
        head = starts[-1]
        while head < last and not lines[head].rstrip().endswith(":"):
            head += 1
        first_body = head + 1
    else:
        first_body = min(1, last)
    hole = max(0, min(hole_lines, last + 1 - first_body))
    latest = max(first_body, last + 1 - max(hole, 1))  # the cut leaves a body line after it
    span = latest - first_body
    cut = rng.randint(first_body + span // 4, latest - span // 4)
    suffix = "".join(lines[cut + hole :])
    return "".join(lines[:cut]), suffix if suffix.strip() else "\n"


def load_cases(path: Path | None, seed: int, hole_lines: int = 1) -> list[FimCase]:
    from server.engine.fim import suffix_stops
    from trainer.tasks import read_mbpp_rows

    cases: list[FimCase] = []
    for task in read_mbpp_rows(path):  # every MBPP+ row, plain or gzipped file
        code = str(task["prompt"]) + str(task["canonical_solution"])
        rng = random.Random(f"{seed}:{task['task_id']}")
        prefix, suffix = split_code(code, str(task["entry_point"]), rng, hole_lines)
        cases.append(
            FimCase(
                task_id=str(task["task_id"]),
                prefix=prefix,
                suffix=suffix,
                stops=tuple(suffix_stops(suffix)),
            )
        )
    if not cases:
        raise SystemExit(f"no tasks in {path}")
    random.Random(seed).shuffle(cases)
    return cases


def kaizen_body(case: FimCase, model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": case.prefix,
        "suffix": case.suffix,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def raw_body(
    case: FimCase, model: str, max_tokens: int, stop_token_ids: list[int]
) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": case.fim_prompt(),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": list(case.stops) or None,
        "stop_token_ids": stop_token_ids,
    }


def fim_end_token_ids(model_dir: Path) -> list[int]:
    """The ids of ``FIM_END_TOKENS``, looked up exactly as Kaizen's engine does."""
    from transformers import AutoTokenizer

    from server.engine.fim import FIM_END_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids: list[int] = []
    for token in FIM_END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(int(token_id))
    return ids


# ------------------------------------------------------------------------------ load


@dataclass
class RequestResult:
    index: int
    task_id: str
    ok: bool
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    text: str = ""
    error: str | None = None


@dataclass
class LoadResult:
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)


async def _one_request(
    client: httpx.AsyncClient, index: int, task_id: str, body: dict[str, Any]
) -> RequestResult:
    streamed = await stream_completion(client, "/v1/completions", body)
    error = streamed.error
    if error is None and streamed.completion_tokens is None:
        error = "no usage chunk"
    return RequestResult(
        index=index,
        task_id=task_id,
        ok=error is None,
        ttft_ms=None if streamed.ttft_s is None else streamed.ttft_s * 1000,
        latency_ms=streamed.total_s * 1000,
        prompt_tokens=streamed.prompt_tokens,
        completion_tokens=streamed.completion_tokens,
        finish_reason=streamed.finish_reason,
        response_id=streamed.response_id,
        text=streamed.text,
        error=error,
    )


async def run_load(
    base_url: str,
    token: str | None,
    jobs: list[tuple[int, str, dict[str, Any]]],
    *,
    concurrency: int,
    request_timeout: float,
    phase_timeout: float,
    desc: str | None,
) -> LoadResult:
    """Send ``jobs`` through ``concurrency`` closed-loop clients; ``desc`` shows a tqdm bar."""
    from tqdm import tqdm

    if not base_url.startswith(f"http://{LOOPBACK}:"):
        raise ValueError(f"loopback only: {base_url}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    pending = deque(jobs)
    results: list[RequestResult] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="req", disable=desc is None, leave=True)

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            index, task_id, body = pending.popleft()
            results.append(await _one_request(client, index, task_id, body))
            bar.update(1)

    async with httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        limits=limits,
        timeout=httpx.Timeout(request_timeout, connect=10.0),
        trust_env=False,  # never through a proxy
    ) as client:
        started = time.perf_counter()
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=phase_timeout)
        except TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            done = {r.index for r in results}
            for index, task_id, _ in jobs:
                if index not in done:
                    results.append(
                        RequestResult(
                            index=index,
                            task_id=task_id,
                            ok=False,
                            error=f"load phase over {phase_timeout:.0f} s",
                        )
                    )
        wall = time.perf_counter() - started
    bar.close()
    results.sort(key=lambda r: r.index)
    return LoadResult(wall_s=wall, results=results)


# ------------------------------------------------------------------------------ servers


@dataclass(frozen=True)
class EngineSettings:
    model_dir: Path
    served_name: str
    dtype: str
    max_model_len: int
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    kv_cache_gib: int
    enforce_eager: bool
    gpu_memory_utilization: float
    seed: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_gib * 2**30


def base_env(settings: EngineSettings) -> dict[str, str]:
    """The environment both servers run with: the caller's minus any KAIZEN_* / KV-cache
    settings, plus the shared KV-cache size and no network."""
    return server_env(VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gib))


def vllm_command() -> list[str]:
    """How to run ``vllm serve``: the console script if it works here, else the same CLI
    through a shim (see ``_VLLM_CLI_SHIM``)."""
    script = Path(sys.executable).with_name("vllm")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", _VLLM_CLI_SHIM]
    return [str(script)] if script.exists() else [sys.executable, "-c", _VLLM_CLI_SHIM]


@dataclass
class RunningServer:
    kind: str
    url: str
    token: str | None
    process: ServerProcess
    startup_s: float
    database_url: str | None = None


def start_raw(settings: EngineSettings, port: int, workdir: Path, timeout: float) -> RunningServer:
    command = [
        *vllm_command(),
        "serve",
        str(settings.model_dir),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--served-model-name",
        settings.served_name,
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--kv-cache-memory-bytes",
        str(settings.kv_cache_bytes),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--seed",
        str(settings.seed),
        "--generation-config",
        "vllm",
        "--disable-log-stats",
        "--enforce-eager" if settings.enforce_eager else "--no-enforce-eager",
        *_scheduler_flags(settings.max_model_len),
    ]
    process = ServerProcess(
        "vllm serve",
        command,
        env=base_env(settings),
        cwd=workdir,
        log_path=workdir / "server.log",
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        startup = process.wait_ready(f"{url}/v1/models", timeout=timeout)
    except BaseException:
        process.stop()
        raise
    return RunningServer(kind="raw", url=url, token=None, process=process, startup_s=startup)


def start_kaizen(
    settings: EngineSettings, port: int, workdir: Path, timeout: float, max_tokens: int
) -> RunningServer:
    home = workdir / "home"
    database_url = f"sqlite:///{home / 'kaizen.db'}"
    env = base_env(settings)
    env.update(
        {
            "KAIZEN_HOME": str(home),
            "KAIZEN_DATABASE_URL": database_url,
            "KAIZEN_MODEL": str(settings.model_dir),
            "KAIZEN_SERVED_MODEL_NAME": settings.served_name,
            "KAIZEN_ADAPTERS": "{}",
            "KAIZEN_HOST": LOOPBACK,
            "KAIZEN_PORT": str(port),
            "KAIZEN_DTYPE": settings.dtype,
            "KAIZEN_MAX_MODEL_LEN": str(settings.max_model_len),
            "KAIZEN_MAX_LORAS": str(settings.max_loras),
            "KAIZEN_MAX_LORA_RANK": str(settings.max_lora_rank),
            "KAIZEN_MAX_CPU_LORAS": str(settings.max_cpu_loras),
            "KAIZEN_KV_CACHE_GIB": str(settings.kv_cache_gib),
            "KAIZEN_ENFORCE_EAGER": "true" if settings.enforce_eager else "false",
            "KAIZEN_GPU_MEMORY_UTILIZATION": str(settings.gpu_memory_utilization),
            "KAIZEN_SEED": str(settings.seed),
            "KAIZEN_MAX_TOKENS_LIMIT": str(max(1024, max_tokens)),
        }
    )
    log_path = workdir / "server.log"
    run_kaizen(["db", "upgrade"], env=env, cwd=workdir, log_path=log_path)
    created = run_kaizen(
        ["tokens", "create", "--role", "ide", "--name", "bench"],
        env=env,
        cwd=workdir,
        log_path=log_path,
    )
    secrets = [line.strip() for line in created.splitlines() if line.strip()]
    if not secrets:
        raise RuntimeError(f"`kaizen tokens create` printed no secret; log: {log_path}")
    token = secrets[-1]
    process = ServerProcess(
        "kaizen serve", [*kaizen_command(), "serve"], env=env, cwd=workdir, log_path=log_path
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        startup = process.wait_ready(f"{url}/readyz", timeout=timeout)
    except BaseException:
        process.stop()
        raise
    return RunningServer(
        kind="kaizen",
        url=url,
        token=token,
        process=process,
        startup_s=startup,
        database_url=database_url,
    )


def count_records(database_url: str, ids: list[str]) -> dict[str, Any]:
    """Rows in Kaizen's ``completions`` for ``ids`` (and their statuses), and all rows."""
    from sqlalchemy import bindparam, create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            total = int(conn.execute(text("SELECT count(*) FROM completions")).scalar_one())
            rows: list[tuple[str, str, int]] = []
            if ids:
                query = text(
                    "SELECT id, status, completion_tokens FROM completions WHERE id IN :ids"
                ).bindparams(bindparam("ids", expanding=True))
                rows = [(str(a), str(b), int(c)) for a, b, c in conn.execute(query, {"ids": ids})]
    finally:
        engine.dispose()
    statuses: dict[str, int] = {}
    for _, status, _ in rows:
        statuses[status] = statuses.get(status, 0) + 1
    return {"found": len(rows), "statuses": statuses, "table_rows": total}


_ENGINE_CONFIG = re.compile(r"Initializing a V1 LLM engine \(v[^)]*\) with config: (.*)$")


def _scheduler_flags(max_model_len: int) -> list[str]:
    """The same scheduler settings Kaizen's engine uses (``scheduler_args``), as CLI flags."""
    from server.engine.vllm_engine import scheduler_args

    args = scheduler_args(max_model_len)
    flags = []
    if args.get("enable_chunked_prefill") is False:
        flags.append("--no-enable-chunked-prefill")
    if "max_num_batched_tokens" in args:
        flags += ["--max-num-batched-tokens", str(args["max_num_batched_tokens"])]
    return flags


def engine_config_line(log_path: Path) -> str | None:
    """vLLM's one-line summary of the resolved engine config, from a server log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = _ENGINE_CONFIG.search(line)
        if match:
            return match.group(1).strip()
    return None


def config_fields(line: str) -> dict[str, str]:
    """Split ``k=v, k=v`` (values may hold nested brackets) into a dict."""
    fields: dict[str, str] = {}
    depth, start = 0, 0
    quote: str | None = None
    pieces: list[str] = []
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(line[start:i])
            start = i + 1
    pieces.append(line[start:])
    for piece in pieces:
        key, _, value = piece.strip().partition("=")
        if key:
            fields[key] = value
    return fields


# ------------------------------------------------------------------------------ summary


def summarize(load: LoadResult) -> dict[str, Any]:
    ok = [r for r in load.results if r.ok]
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    latencies = [r.latency_ms for r in ok]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    return {
        "requests": len(load.results),
        "ok": len(ok),
        "errors": len(load.results) - len(ok),
        "empty_outputs": sum(1 for r in ok if r.ttft_ms is None),
        "wall_s": load.wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / load.wall_s if load.wall_s > 0 else None,
        "requests_per_s": len(ok) / load.wall_s if load.wall_s > 0 else None,
        "ttft_ms": {
            "p50": percentile(ttfts, 50),
            "p90": percentile(ttfts, 90),
            "p99": percentile(ttfts, 99),
            "mean": sum(ttfts) / len(ttfts) if ttfts else None,
        },
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
    }


def pooled(loads: list[LoadResult]) -> dict[str, Any]:
    merged = LoadResult(wall_s=sum(load.wall_s for load in loads))
    for load in loads:
        merged.results.extend(load.results)
    return summarize(merged)


def comparison(raw: dict[str, Any], kaizen: dict[str, Any]) -> dict[str, Any]:
    return {
        "ttft_p50": ratio(kaizen["ttft_ms"]["p50"], raw["ttft_ms"]["p50"]),
        "ttft_p99": ratio(kaizen["ttft_ms"]["p99"], raw["ttft_ms"]["p99"]),
        "latency_p50": ratio(kaizen["latency_ms"]["p50"], raw["latency_ms"]["p50"]),
        "output_tokens_per_s": ratio(kaizen["output_tokens_per_s"], raw["output_tokens_per_s"]),
    }


def same_outputs(raw: LoadResult, kaizen: LoadResult) -> dict[str, int]:
    by_index = {r.index: r for r in raw.results if r.ok}
    texts = tokens = prompts = compared = 0
    for r in kaizen.results:
        other = by_index.get(r.index)
        if not r.ok or other is None:
            continue
        compared += 1
        texts += r.text == other.text
        tokens += r.completion_tokens == other.completion_tokens
        prompts += r.prompt_tokens == other.prompt_tokens
    return {
        "compared": compared,
        "same_text": texts,
        "same_completion_tokens": tokens,
        "same_prompt_tokens": prompts,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mark(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rounds = Table(title="Per round (Kaizen / raw vllm serve)")
    for column in (
        "round",
        "server",
        "reqs",
        "errors",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "latency p50 ms",
        "out tok/s",
        "wall s",
    ):
        rounds.add_column(column, justify="right")
    for entry in report["rounds"]:
        for kind in SERVERS:
            s = entry[kind]["summary"]
            rounds.add_row(
                str(entry["round"]),
                kind,
                str(s["requests"]),
                str(s["errors"]),
                _fmt(s["ttft_ms"]["p50"]),
                _fmt(s["ttft_ms"]["p99"]),
                _fmt(s["latency_ms"]["p50"]),
                _fmt(s["output_tokens_per_s"]),
                _fmt(s["wall_s"]),
            )
        r = entry["ratios"]
        rounds.add_row(
            str(entry["round"]),
            "ratio",
            "",
            "",
            _fmt(r["ttft_p50"], 3),
            _fmt(r["ttft_p99"], 3),
            _fmt(r["latency_p50"], 3),
            _fmt(r["output_tokens_per_s"], 3),
            "",
            end_section=True,
        )
    console.print(rounds)

    p = report["pooled"]
    t = report["targets"]
    table = Table(title=f"Pooled over {len(report['rounds'])} round(s)")
    for column in ("metric", "raw vllm serve", "Kaizen", "Kaizen/raw", "target", "result"):
        table.add_column(column, justify="right")
    raw, kz, rt = p["raw"], p["kaizen"], p["ratios"]
    table.add_row(
        "TTFT p50 (ms)",
        _fmt(raw["ttft_ms"]["p50"]),
        _fmt(kz["ttft_ms"]["p50"]),
        _fmt(rt["ttft_p50"], 3),
        f"<= {TARGET_TTFT_P50_RATIO}",
        _mark(t["ttft_p50_ratio"]),
    )
    table.add_row(
        "TTFT p99 (ms)",
        _fmt(raw["ttft_ms"]["p99"]),
        _fmt(kz["ttft_ms"]["p99"]),
        _fmt(rt["ttft_p99"], 3),
        "",
        "",
    )
    table.add_row(
        "latency p50 (ms)",
        _fmt(raw["latency_ms"]["p50"]),
        _fmt(kz["latency_ms"]["p50"]),
        _fmt(rt["latency_p50"], 3),
        "",
        "",
    )
    table.add_row(
        "output tokens/s",
        _fmt(raw["output_tokens_per_s"]),
        _fmt(kz["output_tokens_per_s"]),
        _fmt(rt["output_tokens_per_s"], 3),
        f">= {TARGET_THROUGHPUT_RATIO}",
        _mark(t["throughput_ratio"]),
    )
    table.add_row(
        "output tokens",
        str(raw["output_tokens"]),
        str(kz["output_tokens"]),
        "",
        "",
        "",
    )
    table.add_row("errors", str(raw["errors"]), str(kz["errors"]), "", "0", _mark(t["no_errors"]))
    for label, key in (("API process CPU ms/req", "api"), ("engine CPU ms/req", "engine")):
        a = report["cpu"]["raw"][f"{key}_ms_per_request"]
        b = report["cpu"]["kaizen"][f"{key}_ms_per_request"]
        table.add_row(label, _fmt(a), _fmt(b), _fmt(ratio(b, a), 3), "", "")
    rec = report["records"]
    table.add_row(
        "requests recorded",
        "",
        f"{rec['found']}/{rec['sent']}",
        "",
        "all",
        _mark(t["every_request_recorded"]),
    )
    same = report["same_outputs"]
    table.add_row(
        "same output text",
        "",
        f"{same['same_text']}/{same['compared']}",
        "",
        "",
        "",
    )
    console.print(table)
    console.print(
        f"engine configs identical: {report['engine_config']['identical']}"
        + (
            f" (differ: {', '.join(report['engine_config']['differences'])})"
            if report["engine_config"]["differences"]
            else ""
        )
    )


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kaizen vs plain `vllm serve`: TTFT and throughput under concurrent load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="bundled", help="'bundled', 'tiny' or a model dir")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="MBPP+ jsonl (default: the bundled copy)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="raw+kaizen pairs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="per round per server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4, help="requests before measuring")
    parser.add_argument("--port-base", type=int, default=18300)
    parser.add_argument("--seed", type=int, default=0, help="prompt split and order")
    parser.add_argument(
        "--hole-lines",
        type=int,
        default=1,
        help="body lines left out between prefix and suffix (0: split without a gap)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="both servers (Kaizen's default is off)",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--phase-timeout", type=float, default=1800.0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir on success")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a speed target is missed too"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "concurrency", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run_server_phase(
    kind: str,
    round_no: int,
    port: int,
    settings: EngineSettings,
    args: argparse.Namespace,
    scratch: Path,
    warmup_jobs: list[tuple[int, str, dict[str, Any]]],
    jobs: list[tuple[int, str, dict[str, Any]]],
) -> dict[str, Any]:
    """Start one server, warm it up, measure, stop it; for Kaizen, count its records."""
    workdir = scratch / f"round{round_no}-{kind}"
    workdir.mkdir(parents=True)
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is in use; pick another --port-base")
    print(f"[round {round_no}] starting {kind} on port {port} (log: {workdir / 'server.log'})")
    if kind == "raw":
        server = start_raw(settings, port, workdir, args.startup_timeout)
    else:
        server = start_kaizen(settings, port, workdir, args.startup_timeout, args.max_tokens)
    warm: LoadResult | None = None
    try:
        print(f"[round {round_no}] {kind} ready after {server.startup_s:.1f} s; warming up")
        if warmup_jobs:
            warm = asyncio.run(
                run_load(
                    server.url,
                    server.token,
                    warmup_jobs,
                    concurrency=min(args.concurrency, len(warmup_jobs)),
                    request_timeout=args.request_timeout,
                    phase_timeout=args.phase_timeout,
                    desc=None,
                )
            )
            failed = [r for r in warm.results if not r.ok]
            if failed:
                raise RuntimeError(
                    f"{kind} warm-up failed: {failed[0].error}; log: {server.process.log_path}"
                )
        cpu_before = server.process.cpu_seconds()
        load = asyncio.run(
            run_load(
                server.url,
                server.token,
                jobs,
                concurrency=args.concurrency,
                request_timeout=args.request_timeout,
                phase_timeout=args.phase_timeout,
                desc=None if args.no_progress else f"round {round_no} {kind}",
            )
        )
        cpu_after = server.process.cpu_seconds()
    finally:
        code = server.process.stop()
    print(f"[round {round_no}] {kind} stopped (exit code {code})")
    entry: dict[str, Any] = {
        "port": port,
        "startup_s": server.startup_s,
        "exit_code": code,
        "log": str(server.process.log_path),
        "engine_config": engine_config_line(server.process.log_path),
        "summary": summarize(load),
        # CPU seconds the server used during the load phase: the API process (HTTP, tokenising,
        # detokenising, SSE, Kaizen's recording) and the engine core with its workers.
        "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_before},
        "load": load,
    }
    if kind == "kaizen":
        assert server.database_url is not None
        ids = [r.response_id for r in load.results if r.response_id]
        counted = count_records(server.database_url, ids)
        counted["sent"] = len(load.results)
        counted["warmup"] = len(warmup_jobs)
        counted["ids_seen"] = len(ids)
        entry["records"] = counted
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    scratch = Path(tempfile.mkdtemp(prefix="kaizen-bench-serving-"))
    print(f"logs and scratch files: {scratch}")
    failed = True
    try:
        model_dir, served_name = resolve_model(args.model, scratch=scratch)
        settings = EngineSettings(
            model_dir=model_dir,
            served_name=served_name,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=max(args.max_cpu_loras, args.max_loras),
            kv_cache_gib=args.kv_cache_gib,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=0.85,
            seed=0,
        )
        cases = load_cases(args.data, args.seed, args.hole_lines)
        end_ids = fim_end_token_ids(model_dir)
        # Measured prompts from the front, warm-up prompts from the back (no shared prefixes
        # beyond what the tasks share), cycling only if there are fewer tasks than requests.
        measured = [cases[i % len(cases)] for i in range(args.requests)]
        warmup = [cases[-1 - i % len(cases)] for i in range(args.warmup)]

        def jobs_for(kind: str, chosen: list[FimCase]) -> list[tuple[int, str, dict[str, Any]]]:
            if kind == "raw":
                return [
                    (i, c.task_id, raw_body(c, served_name, args.max_tokens, end_ids))
                    for i, c in enumerate(chosen)
                ]
            return [
                (i, c.task_id, kaizen_body(c, served_name, args.max_tokens))
                for i, c in enumerate(chosen)
            ]

        print(
            f"model {served_name} at {model_dir}; {len(cases)} tasks; {args.rounds} round(s) x "
            f"{args.requests} requests x concurrency {args.concurrency}; max_tokens "
            f"{args.max_tokens}; stop token ids {end_ids}"
        )
        rounds: list[dict[str, Any]] = []
        port = args.port_base
        for round_no in range(1, args.rounds + 1):
            entry: dict[str, Any] = {"round": round_no}
            for kind in SERVERS:
                entry[kind] = run_server_phase(
                    kind,
                    round_no,
                    port,
                    settings,
                    args,
                    scratch,
                    jobs_for(kind, warmup),
                    jobs_for(kind, measured),
                )
                port += 1  # a fresh port per run: no TIME_WAIT surprises
            entry["ratios"] = comparison(entry["raw"]["summary"], entry["kaizen"]["summary"])
            entry["same_outputs"] = same_outputs(entry["raw"]["load"], entry["kaizen"]["load"])
            rounds.append(entry)

        report = build_report(args, settings, rounds, scratch)
        print_tables(report)
        path = write_results("serving", report, args.results_dir)
        print(f"results: {path}")
        t = report["targets"]
        correct = bool(t["no_errors"] and t["every_request_recorded"])
        fast = bool(t["ttft_p50_ratio"] and t["throughput_ratio"])
        failed = not correct
        if not correct:
            print(f"errors or unrecorded requests; server logs in {scratch}")
        return 0 if correct and (fast or not args.check) else 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; servers stopped; logs in {scratch}")
        return 130
    except Exception as exc:
        print(f"benchmark failed: {exc}\nlogs in {scratch}", file=sys.stderr)
        raise
    finally:
        if not failed and not args.keep_logs:
            shutil.rmtree(scratch, ignore_errors=True)


def build_report(
    args: argparse.Namespace,
    settings: EngineSettings,
    rounds: list[dict[str, Any]],
    scratch: Path,
) -> dict[str, Any]:
    pooled_raw = pooled([r["raw"]["load"] for r in rounds])
    pooled_kaizen = pooled([r["kaizen"]["load"] for r in rounds])
    ratios = comparison(pooled_raw, pooled_kaizen)
    records = {"sent": 0, "found": 0, "warmup": 0, "table_rows": 0, "statuses": {}}
    for entry in rounds:
        rec = entry["kaizen"]["records"]
        records["sent"] += rec["sent"]
        records["found"] += rec["found"]
        records["warmup"] += rec["warmup"]
        records["table_rows"] += rec["table_rows"]
        for status, n in rec["statuses"].items():
            records["statuses"][status] = records["statuses"].get(status, 0) + n
    same: dict[str, int] = {}
    for entry in rounds:
        for key, n in entry["same_outputs"].items():
            same[key] = same.get(key, 0) + n
    configs = {kind: [entry[kind]["engine_config"] for entry in rounds] for kind in SERVERS}
    differences: set[str] = set()
    identical = True
    for raw_line, kaizen_line in zip(configs["raw"], configs["kaizen"], strict=True):
        if raw_line is None or kaizen_line is None:
            identical = False
            continue
        a, b = config_fields(raw_line), config_fields(kaizen_line)
        diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        differences |= diff
        identical = identical and not diff
    cpu: dict[str, dict[str, float | None]] = {}
    for kind in SERVERS:
        api = sum(entry[kind]["cpu_s"]["api"] for entry in rounds)
        engine = sum(entry[kind]["cpu_s"]["engine"] for entry in rounds)
        sent = sum(len(entry[kind]["load"].results) for entry in rounds)
        cpu[kind] = {
            "api_s": api,
            "engine_s": engine,
            "api_ms_per_request": api * 1000 / sent if sent else None,
            "engine_ms_per_request": engine * 1000 / sent if sent else None,
        }
    targets = {
        "ttft_p50_ratio": None
        if ratios["ttft_p50"] is None
        else ratios["ttft_p50"] <= TARGET_TTFT_P50_RATIO,
        "throughput_ratio": None
        if ratios["output_tokens_per_s"] is None
        else ratios["output_tokens_per_s"] >= TARGET_THROUGHPUT_RATIO,
        "no_errors": pooled_raw["errors"] == 0 and pooled_kaizen["errors"] == 0,
        "every_request_recorded": records["found"] == records["sent"]
        and records["table_rows"] == records["sent"] + records["warmup"],
    }
    serial_rounds = []
    for entry in rounds:
        out: dict[str, Any] = {"round": entry["round"]}
        for kind in SERVERS:
            run = dict(entry[kind])
            load: LoadResult = run.pop("load")
            run["wall_s"] = load.wall_s
            run["requests"] = [asdict(r) for r in load.results]
            out[kind] = run
        out["ratios"] = entry["ratios"]
        out["same_outputs"] = entry["same_outputs"]
        serial_rounds.append(out)
    return {
        "benchmark": "serving",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "engine": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
            "kv_cache_bytes": settings.kv_cache_bytes,
        },
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "vllm": _dist_version("vllm-cpu") or _dist_version("vllm"),
            "torch": _dist_version("torch"),
            "transformers": _dist_version("transformers"),
            "git_commit": git_commit(),
        },
        "logs": str(scratch),
        "targets": targets,
        "targets_spec": {
            "ttft_p50_ratio_max": TARGET_TTFT_P50_RATIO,
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
        },
        "pooled": {"raw": pooled_raw, "kaizen": pooled_kaizen, "ratios": ratios},
        "records": records,
        "same_outputs": same,
        "cpu": cpu,
        "engine_config": {
            "identical": identical,
            "differences": sorted(differences),
            "raw": configs["raw"],
            "kaizen": configs["kaizen"],
        },
        "rounds": serial_rounds,
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
