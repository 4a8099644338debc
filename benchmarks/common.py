"""Helpers shared by the benchmarks: percentiles, results files, subprocess servers, the model
to serve and the streaming completion client."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ------------------------------------------------------------------------------ results


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def write_results(name: str, payload: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``<results_dir>/<name>-<UTC timestamp>.json``; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{utc_stamp()}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------ processes


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess in its own session (so its engine children can be stopped with it),
    logging to a file; :meth:`stop` sends SIGTERM and waits, then SIGKILLs what is left."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(self.command)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command,
            env=dict(env),
            cwd=str(cwd),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by the server process itself ("api") and by
        its descendants (the engine core and its workers, "engine")."""
        import psutil

        def used(p: psutil.Process) -> float:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                return float(t.user + t.system)
            return 0.0

        try:
            main = psutil.Process(self.proc.pid)
            children = main.children(recursive=True)
        except psutil.Error:
            return {"api": 0.0, "engine": 0.0}
        return {"api": used(main), "engine": sum(used(c) for c in children)}

    def wait_ready(
        self,
        url: str,
        *,
        timeout: float,
        ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    ) -> float:
        """Poll ``url`` until ``ok``; returns the seconds it took. Raises if the process dies."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode} while starting; "
                        f"log: {self.log_path}\n{tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if ok(client.get(url)):
                        return time.monotonic() - self.started_at
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} was not ready after {timeout:.0f} s; log: {self.log_path}\n"
                        f"{tail(self.log_path)}"
                    )
                time.sleep(0.5)

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM the server, wait for it; SIGKILL its session if it or a child lingers."""
        pgid = self.proc.pid  # start_new_session: the session/group id is the child's pid
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            # Engine children normally exit with their parent; give them a moment, then insist.
            deadline = time.monotonic() + 15
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        finally:
            self._log.close()
        return self.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ runs


def kaizen_command() -> list[str]:
    """How to run the ``kaizen`` command: this interpreter's console script, else
    ``python -m kaizen``."""
    script = Path(sys.executable).with_name("kaizen")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kaizen"]


def run_kaizen(
    step: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path | None = None,
    timeout: float = 300.0,
) -> str:
    """Run ``kaizen <step>`` (e.g. ``db upgrade``) to its end and return what it printed on
    stdout. With ``log_path``, the command line and its output are appended to that file.
    Raises RuntimeError, with the output, when it exits with another code than 0."""
    command = [*kaizen_command(), *step]
    done = subprocess.run(
        command,
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if log_path is not None:
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}".encode())
    if done.returncode != 0:
        where = f"; log: {log_path}" if log_path is not None else ""
        raise RuntimeError(
            f"`kaizen {' '.join(step)}` failed ({done.returncode}){where}\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout


def server_env(**overrides: str) -> dict[str, str]:
    """The environment for a server a benchmark starts: the caller's, less its ``KAIZEN_*``
    settings and ``VLLM_CPU_KVCACHE_SPACE`` (only what the benchmark sets reaches the server),
    offline (no Hugging Face Hub, no usage statistics) and unbuffered; then ``overrides``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAIZEN_") and k != "VLLM_CPU_KVCACHE_SPACE"
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------ models


class Model(NamedTuple):
    """A checkpoint to serve: its directory and the model name clients ask for."""

    path: Path
    served_name: str


def resolve_model(
    spec: str | None = None, *, scratch: Path | None = None, model_cache: Path | None = None
) -> Model:
    """The model for a ``--model`` value, prepared or built if it has to be.

    ``spec`` is one of

    * ``"bundled"``: the bundled checkpoint, prepared on first use in ``model_cache``, by default
      where the server keeps it (``$KAIZEN_MODEL_CACHE``, else ``$KAIZEN_HOME/models``, else
      ``~/.kaizen/models``); served as ``qwen2.5-coder-0.5b-instruct``;
    * ``"tiny"``: the tests' tiny random model, built in ``scratch/tiny-model`` (``scratch``
      defaults to a new temporary directory); served as ``tiny``;
    * a Hugging Face model directory (one with a ``config.json``); served as its name;
    * None: ``$KAIZEN_MODEL`` as the server reads it, else the bundled model.

    Raises SystemExit, with a message for the command line, for a directory that holds no
    ``config.json``.
    """
    if spec is None:
        spec = os.environ.get("KAIZEN_MODEL") or "bundled"
    if spec == "bundled":
        from server.config import Settings
        from server.engine.model import resolve_model_dir
        from server.model_prep import BUNDLED_MODEL_NAME

        # The environment as the server reads it, not a .env file in the current directory; an
        # explicit model_cache=None would override $KAIZEN_MODEL_CACHE, so it is left out then.
        given = {} if model_cache is None else {"model_cache": model_cache}
        settings = Settings(_env_file=None, model="bundled", **given)  # type: ignore[call-arg]
        return Model(Path(resolve_model_dir(settings)), str(BUNDLED_MODEL_NAME))
    if spec == "tiny":
        from tests.utils.tiny_model import build_tiny_model

        if scratch is None:
            scratch = Path(tempfile.mkdtemp(prefix="kaizen-bench-model-"))
        return Model(Path(build_tiny_model(scratch / "tiny-model")), "tiny")
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec}: not a Hugging Face model directory (no config.json)")
    return Model(path, path.name)


# ------------------------------------------------------------------------------ streaming

KAIZEN_HEADER_PREFIX = "x-kaizen-"

StreamFailure = Literal["http", "event", "incomplete", "transport"]


@dataclass
class StreamResult:
    """What one streamed completion (``"stream": true``) brought back.

    ``ok`` when the answer was HTTP 200, no event carried an error and the stream ended with
    ``data: [DONE]``; otherwise ``failure`` says what went wrong and ``error`` how:

    * ``"http"``: another status than 200 (``error`` holds the start of the body);
    * ``"event"``: an event held ``{"error": ...}`` (the server failed after the headers);
    * ``"incomplete"``: the stream ended without ``data: [DONE]``;
    * ``"transport"``: no answer, a connection cut or timed out, or an event that is not a JSON
      object; ``status`` says whether an answer had begun.
    """

    status: int | None = None  # the HTTP status; None: no answer
    headers: dict[str, str] = field(default_factory=dict)  # X-Kaizen-*, lower-case names
    started: float = 0.0  # time.perf_counter() when the request went out
    ttft_s: float | None = None  # from sending to the first event with non-empty text
    total_s: float = 0.0  # from sending to the end of the stream (or the failure)
    text: str = ""  # every choice's text, in the order it arrived
    response_id: str | None = None  # the first event's "id"
    prompt_tokens: int | None = None  # from the usage event (stream_options.include_usage)
    completion_tokens: int | None = None
    finish_reason: str | None = None  # the last one an event gave
    done: bool = False  # the stream ended with data: [DONE]
    failure: StreamFailure | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event in ``lines`` (the body's lines, without their line
    ends): an event ends at a blank line, its ``data:`` lines are joined with newlines,
    comments and other fields are passed over; an event the end of the body cuts off is given
    too."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> StreamResult:
    """POST ``body`` (with ``"stream": true``) to ``url`` (relative to the client's base URL,
    or absolute) and read the server-sent events to ``data: [DONE]``.

    Never raises for what the server or the connection does: every failure is in the result
    (see :class:`StreamResult`). TTFT is taken when the event with the first non-empty text has
    arrived whole; ``headers`` are sent with this request on top of the client's.
    """
    result = StreamResult()
    parts: list[str] = []
    result.started = started = time.perf_counter()

    def fail(failure: StreamFailure, error: str) -> None:
        result.failure, result.error = failure, error

    try:
        async with client.stream(
            "POST", url, json=dict(body), headers=dict(headers or {})
        ) as response:
            result.status = response.status_code
            result.headers = {
                k.lower(): v
                for k, v in response.headers.items()
                if k.lower().startswith(KAIZEN_HEADER_PREFIX)
            }
            if response.status_code != 200:
                content = (await response.aread())[:500].decode(errors="replace")
                fail("http", f"HTTP {response.status_code}: {content}")
            else:
                async with contextlib.aclosing(sse_data(response.aiter_lines())) as events:
                    async for data in events:
                        arrived = time.perf_counter()
                        if data.strip() == "[DONE]":
                            result.done = True
                            break
                        payload = json.loads(data)
                        if not isinstance(payload, dict):
                            raise ValueError(f"an event that is not a JSON object: {data[:200]}")
                        if "error" in payload:
                            fail("event", f"in-stream error: {json.dumps(payload['error'])[:500]}")
                            continue
                        result.response_id = result.response_id or payload.get("id")
                        for choice in payload.get("choices") or []:
                            text = choice.get("text") or ""
                            if text and result.ttft_s is None:
                                result.ttft_s = arrived - started
                            parts.append(text)
                            if choice.get("finish_reason"):
                                result.finish_reason = str(choice["finish_reason"])
                        usage = payload.get("usage")
                        if usage:
                            result.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
                            result.completion_tokens = _int_or_none(usage.get("completion_tokens"))
                if result.failure is None and not result.done:
                    fail("incomplete", "the stream ended without data: [DONE]")
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # ValueError covers json.JSONDecodeError; TypeError / AttributeError an odd event shape.
        fail("transport", f"{type(exc).__name__}: {exc}")
    result.total_s = time.perf_counter() - started
    result.text = "".join(parts)
    return result
