"""Hot-swap under load: how fast a promote or rollback reaches traffic, and what it costs.

Reproduce (the bundled model, one replica; about 4 minutes on 2 CPU cores, nothing else running):

    .venv/bin/python benchmarks/hotswap.py --concurrency 4 --settle 20

A quick end-to-end check with the tests' tiny random model (``--model tiny``, or any model
directory with ``--model DIR``):

    .venv/bin/python benchmarks/hotswap.py --model tiny --concurrency 4 --settle 8

Two replicas on one PostgreSQL database (a fresh database is created on that server and dropped
afterwards; the changes go to replica 1, replica 2 follows by polling the registry every
``--poll-seconds``, so its swap time shows the polling delay):

    .venv/bin/python benchmarks/hotswap.py --replicas 2 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Two replicas with no shared disk for adapters (``--adapter-store s3``: a moto S3 server on
loopback, started the way the tests start it, tests/utils/s3_server.py; each replica fetches
into its own ``KAIZEN_ADAPTER_CACHE_DIR``; the tiny model, about 4 minutes on 2 cores):

    .venv/bin/python benchmarks/hotswap.py --model tiny --replicas 2 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
        --adapter-store s3 --concurrency 2 --settle 8

With a store, each adapter is published (``publish_adapter``: its files, then its checksum
document) and registered and approved during the run, just before the change that first
serves it (1: canary A, 3: promote B), and the benchmark's own copy is deleted (``s3``), so
a replica can only serve it from the store. Per change, ``change -> all replicas serving``
is the slowest replica's swap time, and for those two ``publish -> all replicas serving``
adds the upload, the registration and the promote call before it (``pub->all s`` in the
summary; ``publish_to_all_serving_s`` in the JSON). ``--adapter-store file`` publishes to a
directory standing for a mount every host shares instead (read in place, no cache).

What it does: a fresh ``KAIZEN_HOME`` (a temporary directory, or ``--home``), ``kaizen db
upgrade``, an ``ide`` and an ``ops`` token (``create_token``), two random PEFT LoRA adapters for
the served model written once into the home (rank ``--lora-rank``, all linear layers, A ~ N(0,
1/in) and B scaled so that B @ A * alpha/r has ``--lora-rel`` times the standard deviation of
the base weight it adds to: non-zero, so they change outputs), registered with
``register_adapter`` and moved to ``approved``. Then ``kaizen serve`` (per replica, a
subprocess), and ``--concurrency`` closed-loop clients per replica sending streaming
fill-in-the-middle completions (``max_tokens`` ``--max-tokens``, temperature 0, prompts from a
small fixed list) for the whole run: ``--warmup`` s (not measured), ``--settle`` s of steady
load, then five changes with ``--settle`` s of steady load after each: promote A to canary
(the canary share is 1, so all of the one token's traffic goes to it), promote A from canary to
active (nothing changes for traffic), promote B to active, roll back (A is active again), roll
back (the base model serves).

Per request: start and end (seconds since the load began), TTFT (first chunk with text),
HTTP status, the ``X-Kaizen-Adapter`` header (the version that served it), whether the stream
ended with ``data: [DONE]`` without an error chunk. Every replica's routing is also probed
(``GET /v1/rollout``: ``replica.canary``, else ``replica.active``, as the share is 1) every
``--probe-interval`` s. Per change and replica:

* swap time: from sending the change (t0) to the start of the first request served by the new
  version after which no request started later is served by another one. The switch happened
  between the last request that still got another version (``last old``) and that one, so the
  resolution is the gap between request starts (about latency / concurrency: a second or two
  with the bundled model on 2 cores). ``route s``: the same from the probes (resolution
  ``--probe-interval``), i.e. when the replica's routing switched.
* the change call's own latency (HTTP round trip of the promote / rollback call).
* window: [t0 - 2 s, t0 + swap time + 2 s] (``--window-pad``). With ``--window start`` (the
  default) a window holds the requests that started in it, and a steady phase those that
  started between two windows (after the warm-up, before the end): every request counts once,
  whatever its length. ``--window overlap`` takes the requests overlapping a window and those
  entirely inside a steady phase; that samples long requests into windows and short ones into
  steady phases, so it inflates the ratios even when a swap costs nothing. Steady state before
  / after: the phase before / after the window. p50/p99 latency, TTFT and TPOT (time per output
  token after the first, from the text chunks; text the server holds back as a possible stop
  string arrives late, so it reads low for short outputs) of each, and the ratios window /
  steady before (target p99 latency and TTFT <= 1.5) and window / steady after (before change 1
  the base model serves, after it an adapter, which may cost time on its own: the second ratio
  separates that from the swap). Few requests fall in one window (a p99 of 4 is their
  maximum), so the summary also pools all windows against all steady phases.
* failed requests (non-200, an error chunk, no ``[DONE]``, a transport error): target 0 for
  the whole run, warm-up included.

The ratios are measured to what the registry actually made active (the response of the change);
a change whose result differs from the plan is flagged ("changes as planned").

Prints a table per change and a summary, and writes everything (every request included) to
``benchmarks/results/hotswap-<UTC timestamp>.json``. Server logs stay in the home directory
(kept with ``--home``, ``--keep`` or when something failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `server`, `tests` importable
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

log = logging.getLogger("benchmarks.hotswap")

TARGET_P99_RATIO = 1.5
ADAPTER_HEADER = "x-kaizen-adapter"
BASE = "base"
ADAPTER_NAMES = ("hotswap-a", "hotswap-b")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"
    r"|down_proj)\.weight$"
)

# Small fill-in-the-middle cases: (text before the cursor, text after it).
PROMPTS: tuple[tuple[str, str], ...] = (
    ("def add(a, b):\n    ", "\n    return result\n"),
    ("def is_even(n: int) -> bool:\n    ", "\n\nprint(is_even(4))\n"),
    (
        "def read_lines(path):\n    with open(path) as f:\n        ",
        "\n    return [line.rstrip('\\n') for line in lines]\n",
    ),
    ("import math\n\ndef circle_area(r):\n    ", "\n    return area\n"),
    ("def reverse_words(s: str) -> str:\n    words = ", "\n    return ' '.join(words)\n"),
    (
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
        "        ",
        "\n\n    def pop(self):\n        return self.items.pop()\n",
    ),
    ("def factorial(n):\n    if n == 0:\n        return 1\n    ", "\n\nprint(factorial(5))\n"),
    (
        "def count_vowels(text):\n    count = 0\n    for ch in text:\n        ",
        "\n    return count\n",
    ),
)


# ------------------------------------------------------------------------------ adapters


def target_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{"model.layers.N.self_attn.q_proj": (out, in), ...}`` from the checkpoint's
    safetensors headers (no weights are read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if _LINEAR_KEY.match(key):
                    out_features, in_features = handle.get_slice(key).get_shape()
                    shapes[key.removesuffix(".weight")] = (int(out_features), int(in_features))
    if not shapes:
        raise SystemExit(f"{model_dir}: no Llama/Qwen2-style linear layers in its safetensors")
    return shapes


def base_weight_std(model_dir: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Standard deviation of each projection kind's base weight, read from the middle layer."""
    from safetensors import safe_open

    layers = sorted({int(name.split(".")[2]) for name in shapes})
    middle = layers[len(layers) // 2]
    wanted = {name: name.rsplit(".", 1)[-1] for name in shapes if int(name.split(".")[2]) == middle}
    stds: dict[str, float] = {}
    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                name = key.removesuffix(".weight")
                if name in wanted:
                    stds[wanted[name]] = float(handle.get_tensor(key).float().std())
    return stds


def write_random_lora(
    model_dir: Path, out_dir: Path, *, rank: int, rel: float, seed: int, base_sha256: str
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``,
    ``manifest.json``) for every linear layer of ``model_dir``, with random non-zero A and B.

    A ~ N(0, 1/in) and B ~ N(0, s^2) with s chosen so that the update B @ A * alpha/r has
    ``rel`` times the standard deviation of the base weight of that kind. Returns the manifest.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = target_shapes(model_dir)
    stds = base_weight_std(model_dir, shapes)
    alpha = 2 * rank
    scaling = alpha / rank
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        out_features, in_features = shapes[name]
        kind = name.rsplit(".", 1)[-1]
        # std(B @ A * scaling) = scaling * sqrt(rank) * s_B * s_A with s_A = in^-1/2
        s_b = rel * stds[kind] * in_features**0.5 / (scaling * rank**0.5)
        a = torch.randn((rank, in_features), generator=generator) * in_features**-0.5
        b = torch.randn((out_features, rank), generator=generator) * s_b
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
    ).save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    manifest = {
        "kind": "random LoRA (benchmarks/hotswap.py)",
        "base_model": {"path": str(model_dir), "sha256": base_sha256},
        "rank": rank,
        "lora_alpha": alpha,
        "relative_std": rel,
        "seed": seed,
        "modules": len(shapes),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote LoRA %s (%d modules, rank %d, rel %.3f)", out_dir, len(shapes), rank, rel)
    return manifest


# ------------------------------------------------------------------------------ setup


@dataclass
class World:
    home: Path
    model_dir: Path
    served_name: str
    database_url: str
    ide_token: str
    ops_token: str
    adapters: dict[str, str]  # name -> path
    base_sha256: str
    store: AdapterStore | None = None
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)


@dataclass
class AdapterStore:
    """Where the adapters are published (``--adapter-store``): ``s3``, a moto server on
    loopback (tests/utils/s3_server.py) that the replicas reach over HTTP as they would reach
    AWS or MinIO, each fetching into its own ``KAIZEN_ADAPTER_CACHE_DIR``; ``file``, a
    directory standing for a mount every host shares (read in place, no cache)."""

    kind: str  # "s3" | "file"
    url: str  # KAIZEN_ADAPTER_STORE
    endpoint_url: str | None  # KAIZEN_ADAPTER_STORE_ENDPOINT_URL
    env: dict[str, str]  # what a replica needs besides (the AWS_* variables)

    def replica_env(self, cache_dir: Path) -> dict[str, str]:
        env = {
            **self.env,
            "KAIZEN_ADAPTER_STORE": self.url,
            "KAIZEN_ADAPTER_CACHE_DIR": str(cache_dir),
        }
        if self.endpoint_url:
            env["KAIZEN_ADAPTER_STORE_ENDPOINT_URL"] = self.endpoint_url
        return env


@contextlib.contextmanager
def adapter_store(kind: str, home: Path) -> Iterator[AdapterStore | None]:
    """The store of ``--adapter-store`` for the run (a moto server is stopped afterwards)."""
    if kind == "none":
        yield None
        return
    if kind == "file":
        yield AdapterStore("file", (home / "store").as_uri(), None, {})
        return
    from tests.utils.s3_server import AWS_ENV, s3_server

    os.environ.update(AWS_ENV)  # this process publishes with boto3's usual variables too
    with s3_server() as server:
        bucket = server.new_bucket()
        log.info("moto S3 server at %s, bucket %s", server.endpoint_url, bucket)
        yield AdapterStore("s3", f"s3://{bucket}/adapters", server.endpoint_url, dict(AWS_ENV))


def register_approved(
    session: Any, world: World, name: str, path: str, artifact: Any | None
) -> None:
    """Register a version (with where it was published, if it was) and approve it."""
    from server.store import registry

    adapter = registry.register_adapter(
        session=session,
        name=name,
        path=path,
        base_sha256=world.base_sha256,
        manifest=world.manifests[name],
        parent_id=None,
        round_id=None,
        actor="benchmark",
        artifact=artifact,
    )
    for state in ("evaluating", "approved"):
        registry.transition(
            session=session,
            adapter=adapter,
            to_state=state,
            actor="benchmark",
            reason="hotswap benchmark",
        )
    world.registered.add(name)


def publish_and_register(world: World, name: str) -> dict[str, Any]:
    """What the trainer does with a finished version, timed: publish it to the store
    (``publish_adapter``: files, then the checksum document), then register and approve it.
    The benchmark's own copy is deleted afterwards (``s3``), so a replica can only have it
    from the store. Returns the seconds each step took."""
    from server.store.artifacts import publish_adapter
    from server.store.db import make_engine, make_session_factory

    assert world.store is not None
    path = world.adapters[name]
    started = time.perf_counter()
    published = publish_adapter(
        Path(path), name=name, store=world.store.url, endpoint_url=world.store.endpoint_url
    )
    published_at = time.perf_counter()
    if world.store.kind == "s3":
        shutil.rmtree(path)
    db = make_engine(world.database_url)
    try:
        with make_session_factory(db)() as session:
            register_approved(session, world, name, path, published)
    finally:
        db.dispose()
    log.info("published %s to %s (%s)", name, published.uri, published.sha256[:12])
    return {
        "publish_s": published_at - started,
        "register_s": time.perf_counter() - published_at,
        "uri": published.uri,
    }


def world_env(world_home: Path, database_url: str) -> dict[str, str]:
    """The caller's environment minus KAIZEN_* and the KV-cache variable, plus this run's."""
    return server_env(
        KAIZEN_HOME=str(world_home),
        KAIZEN_DATABASE_URL=database_url,
        KAIZEN_ADAPTERS="{}",
        KAIZEN_HOST=LOOPBACK,
    )


def prepare_world(
    args: argparse.Namespace, home: Path, database_url: str, store: AdapterStore | None = None
) -> World:
    """Migrate the database, create the tokens, write the two adapters and register them (with
    a ``store``, they are published and registered during the run, just before the change
    that first serves each)."""
    from server.engine.lora import base_fingerprint
    from server.store.db import make_engine, make_session_factory
    from server.store.rollout import set_rollout_state
    from server.store.tokens import Role, create_token

    model_dir, served_name = resolve_model(args.model, scratch=home)
    run_kaizen(["db", "upgrade"], env=world_env(home, database_url), cwd=home)
    base_sha256 = str(base_fingerprint(model_dir)["sha256"])
    adapters: dict[str, str] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for seed, name in enumerate(ADAPTER_NAMES, start=1):
        path = home / "adapters" / name
        manifests[name] = write_random_lora(
            model_dir,
            path,
            rank=args.lora_rank,
            rel=args.lora_rel,
            seed=args.seed + seed,
            base_sha256=base_sha256,
        )
        adapters[name] = str(path)
    world = World(
        home=home,
        model_dir=model_dir,
        served_name=served_name,
        database_url=database_url,
        ide_token="",
        ops_token="",
        adapters=adapters,
        base_sha256=base_sha256,
        store=store,
        manifests=manifests,
    )
    db = make_engine(database_url)
    try:
        with make_session_factory(db)() as session:
            _, world.ide_token = create_token(session=session, name="hotswap-ide", role=Role.IDE)
            _, world.ops_token = create_token(session=session, name="hotswap-ops", role=Role.OPS)
            if store is None:
                for name, path in adapters.items():
                    register_approved(session, world, name, path, None)
            # One token drives the load, and the canary is sticky per token: a share of 1
            # sends all of it to the canary, so its arrival is measurable like a promotion.
            set_rollout_state(session=session, actor="benchmark", canary_share=1.0)
    finally:
        db.dispose()
    return world


@dataclass
class Replica:
    index: int  # 1-based
    url: str
    process: ServerProcess
    startup_s: float = 0.0


def start_replicas(world: World, args: argparse.Namespace) -> list[Replica]:
    """Start every replica at once (their engines load in parallel), then wait for each."""
    replicas: list[Replica] = []
    try:
        for i in range(1, args.replicas + 1):
            port = args.port_base + i - 1
            if not port_is_free(port):
                raise RuntimeError(f"port {port} is in use; pick another --port-base")
            env = world_env(world.home, world.database_url)
            env.update(
                {
                    "KAIZEN_MODEL": str(world.model_dir),
                    "KAIZEN_SERVED_MODEL_NAME": world.served_name,
                    "KAIZEN_PORT": str(port),
                    "KAIZEN_KV_CACHE_GIB": str(args.kv_cache_gib),
                    "KAIZEN_MAX_MODEL_LEN": str(args.max_model_len),
                    "KAIZEN_ENFORCE_EAGER": "true" if args.enforce_eager else "false",
                    "KAIZEN_MAX_TOKENS_LIMIT": str(max(1024, args.max_tokens)),
                }
            )
            if args.poll_seconds is not None:
                env["KAIZEN_ROLLOUT_POLL_SECONDS"] = str(args.poll_seconds)
            if world.store is not None:  # each replica its own cache: no disk shared for them
                env.update(world.store.replica_env(world.home / f"replica-{i}" / "adapter-cache"))
            log_path = world.home / f"replica-{i}.log"
            process = ServerProcess(
                f"kaizen serve (replica {i})",
                [*kaizen_command(), "serve"],
                env=env,
                cwd=world.home,
                log_path=log_path,
            )
            replicas.append(Replica(index=i, url=f"http://{LOOPBACK}:{port}", process=process))
            log.info("replica %d starting on port %d (log: %s)", i, port, log_path)
        for replica in replicas:
            replica.startup_s = replica.process.wait_ready(
                f"{replica.url}/readyz", timeout=args.startup_timeout
            )
            log.info("replica %d ready after %.1f s", replica.index, replica.startup_s)
    except BaseException:
        for replica in replicas:
            replica.process.stop()
        raise
    return replicas


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new database on the server of ``admin_url``, dropped afterwards (yields its URL)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"kaizen_hotswap_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    log.info("created database %s", name)
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log.info("dropped database %s", name)


# ------------------------------------------------------------------------------ load


@dataclass
class Req:
    replica: int
    client: int
    seq: int
    prompt: int
    start: float  # seconds since the load began
    end: float = 0.0
    ttft: float | None = None  # seconds from start to the first chunk with text
    status: int | None = None
    adapter: str | None = None  # X-Kaizen-Adapter
    ok: bool = False
    error: str | None = None
    completion_tokens: int | None = None
    text: str = ""
    id: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (comparable across output lengths)."""
        if self.ttft is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


def request_body(served_name: str, prompt: int, max_tokens: int) -> dict[str, Any]:
    prefix, suffix = PROMPTS[prompt]
    return {
        "model": served_name,
        "prompt": prefix,
        "suffix": suffix,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client: httpx.AsyncClient, req: Req, body: dict[str, Any], t0: float) -> Req:
    streamed = await stream_completion(client, "/v1/completions", body)
    req.end = time.perf_counter() - t0
    req.status = streamed.status
    req.adapter = streamed.headers.get(ADAPTER_HEADER)
    if streamed.ttft_s is not None:  # counted from req.start, as req.end is
        req.ttft = streamed.started - t0 - req.start + streamed.ttft_s
    req.completion_tokens = streamed.completion_tokens
    req.text = streamed.text
    req.id = streamed.response_id
    req.error = streamed.error
    if req.error is None and req.adapter is None:
        req.error = f"no {ADAPTER_HEADER} header"
    req.ok = req.error is None
    return req


async def client_loop(
    replica: int,
    client_no: int,
    client: httpx.AsyncClient,
    stop: asyncio.Event,
    out: list[Req],
    t0: float,
    args: argparse.Namespace,
    served_name: str,
) -> None:
    seq = 0
    while not stop.is_set():
        prompt = (client_no + seq) % len(PROMPTS)  # clients at different prompts, all rotate
        req = Req(
            replica=replica,
            client=client_no,
            seq=seq,
            prompt=prompt,
            start=time.perf_counter() - t0,
        )
        out.append(
            await one_request(client, req, request_body(served_name, prompt, args.max_tokens), t0)
        )
        if not req.ok:
            log.warning(
                "replica %d client %d request %d failed: %s", replica, client_no, seq, req.error
            )
            await asyncio.sleep(0.5)  # a dead server must not turn this into a busy loop
        seq += 1


@dataclass(frozen=True)
class Probe:
    replica: int
    at: float  # seconds since the load began (when the answer arrived)
    active: str  # what the replica routes to ("base": none)


@dataclass(frozen=True)
class Change:
    label: str
    short: str
    kind: str  # "canary" | "promote" | "rollback"
    adapter: str | None  # what to promote
    expect: str  # the version that should serve afterwards ("base": none)


@dataclass
class ChangeRun:
    change: Change
    sent: float  # seconds since the load began
    answered: float
    status: int
    response: Any
    actual: str  # what the registry made active ("base": none); swap times are measured to it
    # With --adapter-store: the version this change serves first was published just before it
    # (seconds since the load began when publishing started; the steps' durations).
    published: float | None = None
    publish: dict[str, Any] | None = None

    @property
    def call_ms(self) -> float:
        return (self.answered - self.sent) * 1000


def plan() -> list[Change]:
    a, b = ADAPTER_NAMES
    return [
        Change(f"promote {a} to canary (share 1.0)", "canary A", "canary", a, a),
        Change(f"promote {a} from canary to active", "promote A", "promote", a, a),
        Change(f"promote {b} to active", "promote B", "promote", b, b),
        Change(f"roll back (to {a})", "rollback -> A", "rollback", None, a),
        Change(f"roll back (to {BASE})", "rollback -> base", "rollback", None, BASE),
    ]


@dataclass
class Machine:
    """CPU use on the machine while the load ran: everything, the servers, this process."""

    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpus: int = 0
    wall_s: float = 0.0
    busy_cpu_s: float = 0.0
    servers_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    samples: list[float] = field(default_factory=list)  # machine CPU % once a second

    @property
    def others_cpu_s(self) -> float:
        return max(0.0, self.busy_cpu_s - self.servers_cpu_s - self.client_cpu_s)


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(
        t.user
        + t.system
        + getattr(t, "nice", 0.0)
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
    )


def _servers_cpu_s(replicas: Sequence[Replica]) -> float:
    return sum(sum(r.process.cpu_seconds().values()) for r in replicas)


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Scenario:
    reqs: list[Req]
    runs: list[ChangeRun]
    marks: dict[str, float]
    machine: Machine
    probes: list[Probe]


async def run_scenario(world: World, replicas: list[Replica], args: argparse.Namespace) -> Scenario:
    """Steady load on every replica; the changes go to replica 1; every replica's routing is
    probed (GET /v1/rollout) every ``--probe-interval`` s."""
    import psutil

    stop = asyncio.Event()
    out: list[Req] = []
    runs: list[ChangeRun] = []
    probes: list[Probe] = []
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    ide = {"Authorization": f"Bearer {world.ide_token}"}
    ops = {"Authorization": f"Bearer {world.ops_token}"}
    machine = Machine(loadavg_start=os.getloadavg(), cpus=os.cpu_count() or 0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=r.url, headers=ide, limits=limits, timeout=timeout, trust_env=False
                )
            )
            for r in replicas
        ]
        probe_clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=r.url, headers=ops, timeout=timeout, trust_env=False)
            )
            for r in replicas
        ]
        ops_client = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=replicas[0].url, headers=ops, timeout=timeout, trust_env=False
            )
        )
        busy0, servers0, self0 = _busy_cpu_s(), _servers_cpu_s(replicas), _self_cpu_s()
        psutil.cpu_percent()
        t0 = time.perf_counter()

        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                machine.samples.append(psutil.cpu_percent())

        async def probe(replica: int, client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    state = (await client.get("/v1/rollout")).json()
                    at = time.perf_counter() - t0
                    routed = state["replica"]["canary"] or state["replica"]["active"]  # share 1
                    probes.append(Probe(replica, at, routed or BASE))
                await asyncio.sleep(args.probe_interval)

        sampler = asyncio.create_task(sample())
        if args.probe_interval > 0:
            sampler_probes = [
                asyncio.create_task(probe(r.index, probe_clients[k]))
                for k, r in enumerate(replicas)
            ]
        else:
            sampler_probes = []
        tasks = [
            asyncio.create_task(
                client_loop(r.index, c, clients[k], stop, out, t0, args, world.served_name)
            )
            for k, r in enumerate(replicas)
            for c in range(args.concurrency)
        ]
        marks: dict[str, float] = {}
        try:
            await asyncio.sleep(args.warmup)
            marks["warmup_end"] = time.perf_counter() - t0
            log.info("warm-up over; steady load for %.0f s", args.settle)
            await asyncio.sleep(args.settle)
            for number, change in enumerate(plan(), start=1):
                published: float | None = None
                publish: dict[str, Any] | None = None
                if change.adapter is not None and change.adapter not in world.registered:
                    published = time.perf_counter() - t0
                    publish = await asyncio.to_thread(publish_and_register, world, change.adapter)
                    log.info(
                        "published %s in %.2f s, registered in %.2f s",
                        change.adapter,
                        publish["publish_s"],
                        publish["register_s"],
                    )
                sent = time.perf_counter() - t0
                if change.kind in ("canary", "promote"):
                    to = "canary" if change.kind == "canary" else "active"
                    response = await ops_client.post(
                        f"/v1/adapters/{change.adapter}/promote",
                        json={"to": to, "reason": "hotswap benchmark"},
                    )
                else:
                    response = await ops_client.post(
                        "/v1/rollout/rollback", json={"reason": "hotswap benchmark"}
                    )
                answered = time.perf_counter() - t0
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                ok = response.status_code == 200 and isinstance(body, dict)
                serving = "canary" if change.kind == "canary" else "active"
                actual = (body["rollout"][serving] or BASE) if ok else "?"
                run = ChangeRun(
                    change, sent, answered, response.status_code, body, actual, published, publish
                )
                runs.append(run)
                log.info(
                    "change %d (%s): HTTP %d in %.0f ms: %s",
                    number,
                    change.label,
                    response.status_code,
                    run.call_ms,
                    body.get("changes") if isinstance(body, dict) else body,
                )
                if not ok:
                    raise RuntimeError(f"{change.label} failed: HTTP {response.status_code} {body}")
                if actual != change.expect:
                    log.warning(
                        "%s: planned %s, but the registry made %s active; measuring the swap to %s",
                        change.label,
                        change.expect,
                        actual,
                        actual,
                    )
                await asyncio.sleep(args.settle)
        finally:
            stop.set()
            marks["stop"] = time.perf_counter() - t0
            await asyncio.gather(*tasks, *sampler_probes, return_exceptions=True)
            marks["end"] = time.perf_counter() - t0
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            machine.wall_s = time.perf_counter() - t0
            machine.busy_cpu_s = _busy_cpu_s() - busy0
            machine.servers_cpu_s = _servers_cpu_s(replicas) - servers0
            machine.client_cpu_s = _self_cpu_s() - self0
            machine.loadavg_end = os.getloadavg()
        # What each replica routes to at the end (all should agree with the registry).
        for k, r in enumerate(replicas):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                state = (await clients[k].get("/v1/rollout", headers=ops)).json()
                marks[f"replica_{r.index}_routes_active"] = state["replica"]["active"] or BASE
    out.sort(key=lambda q: (q.replica, q.start))
    return Scenario(reqs=out, runs=runs, marks=marks, machine=machine, probes=probes)


# ------------------------------------------------------------------------------ analysis


def stats(reqs: Sequence[Req]) -> dict[str, Any]:
    ok = [q for q in reqs if q.ok]
    lat = [q.latency * 1000 for q in ok]
    ttft = [q.ttft * 1000 for q in ok if q.ttft is not None]
    tpot = [t * 1000 for t in (q.tpot for q in ok) if t is not None]
    tokens = [q.completion_tokens for q in ok if q.completion_tokens is not None]
    return {
        "requests": len(reqs),
        "failed": len(reqs) - len(ok),
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99)},
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
        "mean_output_tokens": sum(tokens) / len(tokens) if tokens else None,
        "versions": dict(Counter(q.adapter or "?" for q in reqs)),
    }


def swap_time(reqs: Sequence[Req], sent: float, until: float, new: str) -> dict[str, Any]:
    """Swap time on one replica: see the module docstring."""
    after = [q for q in reqs if sent <= q.start < until and q.adapter is not None]
    stale = [q for q in after if q.adapter != new]
    last_old = max((q.start for q in stale), default=None)
    fresh = [
        q.start for q in after if q.adapter == new and (last_old is None or q.start > last_old)
    ]
    first_new = min(fresh, default=None)
    return {
        "swap_s": None if first_new is None else first_new - sent,
        "last_old_s": None if last_old is None else last_old - sent,
        "stale_requests": len(stale),
        "stale_versions": dict(Counter(q.adapter or "?" for q in stale)),
        "complete": first_new is not None,
    }


def routing_switch(
    probes: Sequence[Probe], sent: float, until: float, new: str
) -> dict[str, float | None]:
    """When one replica's routing (GET /v1/rollout: ``replica.active``) showed the new version
    for good: the first such probe after ``sent`` and the probe before it (the bounds)."""
    after = [p for p in probes if sent <= p.at < until]
    stale = [p.at for p in after if p.active != new]
    last_old = max(stale, default=None)
    fresh = [p.at for p in after if p.active == new and (last_old is None or p.at > last_old)]
    return {
        "routing_switch_s": None if not fresh else min(fresh) - sent,
        "routing_last_old_s": None if last_old is None else last_old - sent,
        "probes": float(len(after)),
    }


def classify(reqs: Sequence[Req], lo: float, hi: float, mode: str, *, inside: bool) -> list[Req]:
    """Requests of an interval. ``start``: started in [lo, hi) (each request in exactly one
    phase, no bias towards long or short requests). ``overlap``: the window takes requests that
    overlap it (``inside=False``), a steady phase those entirely inside it (``inside=True``);
    that favours long requests in windows and short ones in steady phases."""
    if mode == "start":
        return [q for q in reqs if lo <= q.start < hi]
    if inside:
        return [q for q in reqs if q.start >= lo and q.end <= hi]
    return [q for q in reqs if q.start < hi and q.end > lo]


def analyse(
    reqs: list[Req],
    runs: list[ChangeRun],
    marks: dict[str, float],
    replicas: int,
    pad: float,
    mode: str = "start",
    probes: Sequence[Probe] = (),
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Per change and replica: swap time, window, steady states before and after, ratios; and
    per replica all windows pooled against all steady phases pooled (more requests each)."""
    per_change: list[dict[str, Any]] = []
    pooled: dict[int, tuple[dict[int, Req], dict[int, Req]]] = {}
    for index, run in enumerate(runs):
        until = runs[index + 1].sent if index + 1 < len(runs) else marks["stop"]
        entry: dict[str, Any] = {
            "label": run.change.label,
            "short": run.change.short,
            "expect": run.change.expect,
            "actual": run.actual,
            "sent_s": run.sent,
            "call_ms": run.call_ms,
            "status": run.status,
            "changes": run.response.get("changes") if isinstance(run.response, dict) else None,
            "replicas": {},
        }
        for replica in range(1, replicas + 1):
            mine = [q for q in reqs if q.replica == replica]
            swap = swap_time(mine, run.sent, until, run.actual)
            complete_at = run.sent + swap["swap_s"] if swap["complete"] else until
            entry["replicas"][replica] = {
                **swap,
                **routing_switch(
                    [p for p in probes if p.replica == replica], run.sent, until, run.actual
                ),
                "window_s": [run.sent - pad, complete_at + pad],
            }
        swaps = [d["swap_s"] for d in entry["replicas"].values()]
        all_serving = None if None in swaps else max(swaps)
        entry["change_to_all_serving_s"] = all_serving
        entry["publish"] = run.publish
        entry["publish_to_all_serving_s"] = (
            None
            if run.published is None or all_serving is None
            else run.sent - run.published + all_serving
        )
        per_change.append(entry)
    for index, entry in enumerate(per_change):
        for replica, data in entry["replicas"].items():
            mine = [q for q in reqs if q.replica == replica]
            lo, hi = data["window_s"]
            prev_hi = (
                per_change[index - 1]["replicas"][replica]["window_s"][1]
                if index
                else marks["warmup_end"]
            )
            next_lo = (
                per_change[index + 1]["replicas"][replica]["window_s"][0]
                if index + 1 < len(per_change)
                else marks["end"]
            )
            window = classify(mine, lo, hi, mode, inside=False)
            before = classify(mine, prev_hi, lo, mode, inside=True)
            after = classify(mine, hi, next_lo, mode, inside=True)
            pool = pooled.setdefault(replica, ({}, {}))
            pool[0].update({id(q): q for q in window})
            pool[1].update({id(q): q for q in before + after})
            data["window"] = stats(window)
            data["before"] = stats(before)
            data["after"] = stats(after)
            w, b, a = data["window"], data["before"], data["after"]
            data["ratios"] = {
                "latency_p99_vs_before": ratio(w["latency_ms"]["p99"], b["latency_ms"]["p99"]),
                "ttft_p99_vs_before": ratio(w["ttft_ms"]["p99"], b["ttft_ms"]["p99"]),
                "latency_p99_vs_after": ratio(w["latency_ms"]["p99"], a["latency_ms"]["p99"]),
                "ttft_p99_vs_after": ratio(w["ttft_ms"]["p99"], a["ttft_ms"]["p99"]),
                "tpot_p99_vs_before": ratio(w["tpot_ms"]["p99"], b["tpot_ms"]["p99"]),
            }
            r = data["ratios"]
            data["p99_within_target"] = (
                None
                if r["latency_p99_vs_before"] is None or r["ttft_p99_vs_before"] is None
                else r["latency_p99_vs_before"] <= TARGET_P99_RATIO
                and r["ttft_p99_vs_before"] <= TARGET_P99_RATIO
            )
    return per_change, {
        replica: {"window": stats(list(w.values())), "steady": stats(list(st.values()))}
        for replica, (w, st) in pooled.items()
    }


def outputs_by_version(reqs: Sequence[Req]) -> dict[str, Any]:
    """Greedy texts per (prompt, version): do the adapters change outputs, and does every
    request's text match its own version's usual text (no mixing)?"""
    texts: dict[tuple[int, str], Counter[str]] = {}
    for q in reqs:
        if q.ok and q.adapter:
            texts.setdefault((q.prompt, q.adapter), Counter())[q.text] += 1
    modal = {key: counter.most_common(1)[0][0] for key, counter in texts.items()}
    versions = sorted({v for _, v in modal})
    differs: dict[str, str] = {}
    for v in versions:
        if v == BASE:
            continue
        shared = [p for p in range(len(PROMPTS)) if (p, BASE) in modal and (p, v) in modal]
        changed = sum(modal[(p, v)] != modal[(p, BASE)] for p in shared)
        differs[v] = f"{changed}/{len(shared)}"
    own = other_only = 0
    for q in reqs:
        if not (q.ok and q.adapter):
            continue
        if q.text == modal[(q.prompt, q.adapter)]:
            own += 1
        elif any(q.text == modal.get((q.prompt, v)) for v in versions if v != q.adapter):
            other_only += 1
    return {
        "prompts_whose_text_differs_from_base": differs,
        "requests_matching_own_version_text": own,
        "requests_matching_only_another_versions_text": other_only,
        "distinct_texts_per_prompt_and_version": {
            f"{p}:{v}": len(c) for (p, v), c in sorted(texts.items())
        },
    }


# ------------------------------------------------------------------------------ report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mark(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def _short(version: str) -> str:
    """hotswap-a -> A, hotswap-b -> B (display only)."""
    for name, letter in zip(ADAPTER_NAMES, "AB", strict=True):
        if version == name:
            return letter
    return version


def _versions(counts: dict[str, int]) -> str:
    return " ".join(f"{_short(k)}:{v}" for k, v in sorted(counts.items())) or "-"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    n = len(report["changes"])
    for number, entry in enumerate(report["changes"], start=1):
        planned = (
            ""
            if entry["actual"] == entry["expect"]
            else f" (NOT AS PLANNED: the plan was {entry['expect']})"
        )
        lines = [
            f"Change {number}/{n}: {entry['label']}: call {_fmt(entry['call_ms'])} ms "
            f"(HTTP {entry['status']}): {'; '.join(entry['changes'] or [])}; now serving "
            f"{entry['actual']}{planned}"
        ]
        if entry.get("publish"):
            pub = entry["publish"]
            lines.append(
                f"  publish -> all replicas serving: {_fmt(entry['publish_to_all_serving_s'], 2)} s"
                f" (upload to the store {pub['publish_s']:.2f} s, register and approve "
                f"{pub['register_s']:.2f} s, then the change; {pub['uri']})"
            )
        lines.append(
            f"  change -> all replicas serving: {_fmt(entry['change_to_all_serving_s'], 2)} s"
        )
        for replica, d in entry["replicas"].items():
            swap = (
                f"{_fmt(d['swap_s'], 2)} s"
                if d["complete"]
                else f"not complete ({d['stale_requests']} requests after it got another version)"
            )
            last_old = "none" if d["last_old_s"] is None else f"{d['last_old_s']:.2f} s"
            routed = (
                "-"
                if d["routing_switch_s"] is None
                else f"{d['routing_switch_s']:.2f} s (last probe still old: "
                + (
                    "none"
                    if d["routing_last_old_s"] is None
                    else f"{d['routing_last_old_s']:.2f} s"
                )
                + ")"
            )
            lines.append(
                f"  replica {replica}: swap time {swap} (last request on another version started "
                f"at {last_old}); routing switched at {routed}; window "
                f"{d['window_s'][0]:.1f}-{d['window_s'][1]:.1f} s"
            )
        table = Table(title="\n".join(lines), title_justify="left")
        for column in (
            "replica",
            "metric",
            "steady before",
            "window",
            "steady after",
            "window/before",
            "window/after",
        ):
            table.add_column(column, justify="right")
        for replica, d in entry["replicas"].items():
            b, w, a = d["before"], d["window"], d["after"]
            rows: list[tuple[str, str, str, str, str, str]] = [
                ("requests", str(b["requests"]), str(w["requests"]), str(a["requests"]), "", ""),
                ("failed", str(b["failed"]), str(w["failed"]), str(a["failed"]), "", ""),
            ]
            for label, key, quant in (
                ("latency p50 ms", "latency_ms", "p50"),
                ("latency p99 ms", "latency_ms", "p99"),
                ("TTFT p50 ms", "ttft_ms", "p50"),
                ("TTFT p99 ms", "ttft_ms", "p99"),
                ("TPOT p50 ms", "tpot_ms", "p50"),
                ("TPOT p99 ms", "tpot_ms", "p99"),
            ):
                rows.append(
                    (
                        label,
                        _fmt(b[key][quant]),
                        _fmt(w[key][quant]),
                        _fmt(a[key][quant]),
                        _fmt(ratio(w[key][quant], b[key][quant]), 2),
                        _fmt(ratio(w[key][quant], a[key][quant]), 2),
                    )
                )
            rows.append(
                (
                    "output tokens, mean",
                    _fmt(b["mean_output_tokens"], 1),
                    _fmt(w["mean_output_tokens"], 1),
                    _fmt(a["mean_output_tokens"], 1),
                    "",
                    "",
                )
            )
            rows.append(
                (
                    "served by",
                    _versions(b["versions"]),
                    _versions(w["versions"]),
                    _versions(a["versions"]),
                    "",
                    "",
                )
            )
            for k, row in enumerate(rows):
                table.add_row(str(replica) if k == 0 else "", *row, end_section=k == len(rows) - 1)
        console.print(table)

    s = report["summary"]
    summary = Table(title="Summary", title_justify="left")
    summary.add_column("change", no_wrap=True)
    for column in (
        "serves",
        "rep",
        "swap s",
        "route s",
        "all s",
        "pub->all s",
        "call ms",
        "window reqs",
        "failed",
        "lat p99 x",
        "TTFT p99 x",
        f"<= {TARGET_P99_RATIO}x",
    ):
        summary.add_column(column, justify="right")
    for number, entry in enumerate(report["changes"], start=1):
        for k, (replica, d) in enumerate(entry["replicas"].items()):
            summary.add_row(
                f"{number} {entry['short']}",
                _short(entry["actual"]) + ("" if entry["actual"] == entry["expect"] else " (!)"),
                str(replica),
                _fmt(d["swap_s"], 2) if d["complete"] else "incomplete",
                _fmt(d["routing_switch_s"], 2),
                "" if k else _fmt(entry["change_to_all_serving_s"], 2),
                "" if k or not entry.get("publish") else _fmt(entry["publish_to_all_serving_s"], 2),
                _fmt(entry["call_ms"]),
                str(d["window"]["requests"]),
                str(d["window"]["failed"]),
                _fmt(d["ratios"]["latency_p99_vs_before"], 2),
                _fmt(d["ratios"]["ttft_p99_vs_before"], 2),
                _mark(d["p99_within_target"]),
            )
    for replica, pool in report["pooled"].items():
        w, st = pool["window"], pool["steady"]
        summary.add_row(
            "pooled: windows/steady",
            "",
            str(replica),
            "",
            "",
            "",
            "",
            "",
            f"{w['requests']}/{st['requests']}",
            f"{w['failed']}/{st['failed']}",
            _fmt(ratio(w["latency_ms"]["p99"], st["latency_ms"]["p99"]), 2),
            _fmt(ratio(w["ttft_ms"]["p99"], st["ttft_ms"]["p99"]), 2),
            "",
        )
    console.print(summary)
    t = report["targets"]
    m = report["machine"]
    differs = report["outputs"]["prompts_whose_text_differs_from_base"]
    console.print(
        f"requests {s['requests']} (warm-up {s['warmup_requests']}), failed {s['failed']} "
        f"[{_mark(t['no_failed_requests'])}]; every swap complete "
        f"[{_mark(t['every_swap_complete'])}]; changes as planned "
        f"[{_mark(t['changes_as_planned'])}]; p99 latency and TTFT in every window <= "
        f"{TARGET_P99_RATIO}x steady before [{_mark(t['p99_ratio'])}]; max swap "
        f"{_fmt(s['max_swap_s'], 2)} s\n"
        + (
            f"adapter store {report['adapter_store']['kind']} ({report['adapter_store']['url']}): "
            f"publish -> all replicas serving, max {_fmt(s['max_publish_to_all_serving_s'], 2)} s;"
            " fetches from the store per replica "
            + ", ".join(f"{r['index']}: {r['adapter_fetches']}" for r in report["replicas"])
            + "\n"
            if report.get("adapter_store")
            else ""
        )
        + "greedy text differs from the base model's for "
        + ", ".join(f"{_short(k)} {v}" for k, v in differs.items())
        + " prompts\n"
        + f"machine: {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{m['loadavg_end'][0]:.2f} at the end; CPU busy {m['busy_percent']:.0f}% over "
        f"{m['wall_s']:.0f} s of load: Kaizen servers {m['servers_cpu_s']:.0f} CPU-s, this "
        f"client {m['client_cpu_s']:.0f} CPU-s, other processes {m['others_cpu_s']:.0f} CPU-s",
        markup=False,
    )


def build_report(
    args: argparse.Namespace, world: World, replicas: list[Replica], scenario: Scenario
) -> dict[str, Any]:
    reqs, runs, marks, machine = scenario.reqs, scenario.runs, scenario.marks, scenario.machine
    changes, pooled = analyse(
        reqs, runs, marks, len(replicas), args.window_pad, args.window, scenario.probes
    )
    failed = [q for q in reqs if not q.ok]
    swaps = [
        d["swap_s"] for c in changes for d in c["replicas"].values() if d["swap_s"] is not None
    ]
    within = [d["p99_within_target"] for c in changes for d in c["replicas"].values()]
    published = [c["publish_to_all_serving_s"] for c in changes if c.get("publish")]
    targets = {
        "no_failed_requests": not failed,
        "every_swap_complete": len(runs) == len(plan())
        and all(d["complete"] for c in changes for d in c["replicas"].values()),
        "p99_ratio": None if None in within else all(within),
        "changes_as_planned": all(run.actual == run.change.expect for run in runs),
    }
    return {
        "benchmark": "hotswap",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {
            "dir": str(world.model_dir),
            "served_name": world.served_name,
            "base_sha256": world.base_sha256,
        },
        "adapters": world.adapters,
        "database": "postgresql" if world.database_url.startswith("postgresql") else "sqlite",
        "adapter_store": None
        if world.store is None
        else {
            "kind": world.store.kind,
            "url": world.store.url,
            "endpoint_url": world.store.endpoint_url,
            "replica_cache_dirs": [
                str(world.home / f"replica-{r.index}" / "adapter-cache") for r in replicas
            ],
        },
        "home": str(world.home),
        "replicas": [
            {
                "index": r.index,
                "url": r.url,
                "startup_s": r.startup_s,
                "log": str(r.process.log_path),
                "exit_code": r.process.proc.returncode,
                "error_lines": error_lines(r.process.log_path),
                "adapter_fetches": count_lines(r.process.log_path, "event=adapter_fetched"),
            }
            for r in replicas
        ],
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git_commit": git_commit(),
        },
        "machine": {
            **asdict(machine),
            "others_cpu_s": machine.others_cpu_s,
            "busy_percent": 100 * machine.busy_cpu_s / (machine.wall_s * machine.cpus)
            if machine.wall_s and machine.cpus
            else 0.0,
        },
        "marks_s": marks,
        "targets": targets,
        "targets_spec": {"failed_requests": 0, "p99_ratio_max": TARGET_P99_RATIO},
        "summary": {
            "requests": len(reqs),
            "warmup_requests": sum(1 for q in reqs if q.start < marks["warmup_end"]),
            "failed": len(failed),
            "failures": [asdict(q) for q in failed[:50]],
            "max_swap_s": max(swaps, default=None),
            # None when a publish's swap did not complete on every replica
            "publish_to_all_serving_s": published,
            "max_publish_to_all_serving_s": None
            if not published or None in published
            else max(published),
        },
        "changes": changes,
        "pooled": pooled,
        "outputs": outputs_by_version(reqs),
        "prompts": [list(p) for p in PROMPTS],
        "requests": [
            {**asdict(q), "latency": q.latency, "tpot": q.tpot}
            for q in sorted(reqs, key=lambda q: q.start)
        ],
        "probes": [asdict(p) for p in scenario.probes],
    }


def count_lines(path: Path, needle: str) -> int:
    """Lines of a server log that contain ``needle``."""
    try:
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def error_lines(path: Path, limit: int = 20) -> list[str]:
    """Lines of a server log that look like errors (for failed requests: why)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [
        line
        for line in lines
        if "level=ERROR" in line or "Traceback" in line or "level=CRITICAL" in line
    ]
    return hits[:limit]


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hot-swap under steady streaming load: swap time, failures, p99 latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="bundled", help="'bundled', 'tiny' or a model dir")
    parser.add_argument("--concurrency", type=int, default=4, help="clients per replica")
    parser.add_argument("--settle", type=float, default=20.0, help="steady seconds per phase")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of unmeasured load")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window-pad", type=float, default=2.0, help="seconds around a swap")
    parser.add_argument(
        "--window",
        choices=("start", "overlap"),
        default="start",
        help="which requests a window or steady phase holds: those that started in it, or "
        "(overlap) those overlapping a window and those entirely inside a steady phase",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.2,
        help="seconds between GET /v1/rollout probes of each replica's routing (0: off)",
    )
    parser.add_argument("--replicas", type=int, default=1, choices=(1, 2))
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server (postgresql+psycopg://.../<admin db>): a fresh database is "
        "created there and dropped afterwards; default: SQLite in the home (one replica only)",
    )
    parser.add_argument(
        "--adapter-store",
        choices=("none", "s3", "file"),
        default="none",
        help="publish the adapters during the run (publish_adapter) to an S3 store (a moto "
        "server on loopback; each replica fetches into its own KAIZEN_ADAPTER_CACHE_DIR) or a "
        "file:// store (a shared mount, read in place); none: registered where they were written",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=None, help="KAIZEN_ROLLOUT_POLL_SECONDS (2.0)"
    )
    parser.add_argument("--home", type=Path, default=None, help="KAIZEN_HOME (fresh; kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--lora-rel",
        type=float,
        default=0.2,
        help="std of each LoRA update relative to the std of the base weight",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port-base", type=int, default=18400)
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="default 2 (tiny: 0.25)")
    parser.add_argument("--max-model-len", type=int, default=None, help="default 2048 (tiny: 512)")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: off (tiny: on)",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    if args.kv_cache_gib is None:
        args.kv_cache_gib = 0.25 if tiny else 2.0
    if args.max_model_len is None:
        args.max_model_len = 512 if tiny else 2048
    if args.enforce_eager is None:
        args.enforce_eager = tiny
    if args.concurrency < 1 or args.max_tokens < 1 or args.settle <= 0:
        parser.error("--concurrency and --max-tokens must be at least 1, --settle positive")
    if args.replicas > 1 and not (args.database_url or "").startswith("postgresql"):
        parser.error("--replicas 2 needs --database-url postgresql+psycopg://...")
    if args.database_url and not args.database_url.startswith("postgresql"):
        parser.error("--database-url: a PostgreSQL URL (without it: SQLite in the home)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    if args.home is not None:
        home = args.home.expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        if any(home.iterdir()):
            raise SystemExit(f"--home {home} is not empty; give a fresh directory")
    else:
        home = Path(tempfile.mkdtemp(prefix="kaizen-bench-hotswap-"))
    log.info("KAIZEN_HOME %s", home)
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            if args.database_url:
                database_url = stack.enter_context(fresh_postgres(args.database_url))
            else:
                database_url = f"sqlite:///{home / 'kaizen.db'}"
            store = stack.enter_context(adapter_store(args.adapter_store, home))
            world = prepare_world(args, home, database_url, store)
            replicas = start_replicas(world, args)
            try:
                scenario = asyncio.run(run_scenario(world, replicas, args))
            finally:
                for replica in replicas:
                    code = replica.process.stop()
                    log.info("replica %d stopped (exit code %s)", replica.index, code)
            report = build_report(args, world, replicas, scenario)
        print_report(report)
        path = write_results("hotswap", report, args.results_dir)
        print(f"results: {path}")
        t = report["targets"]
        ok = bool(t["no_failed_requests"] and t["every_swap_complete"])
        if not ok:
            print(f"failed requests or incomplete swaps; server logs in {home}")
        return 0 if ok and (t["p99_ratio"] or not args.check) else 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; servers stopped; logs in {home}")
        return 130
    finally:
        if ok and args.home is None and not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
