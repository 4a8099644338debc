"""Soak: concurrent clients against the real server through a crash or a database outage, and
an audit of every acknowledged completion against what the database holds afterwards.

Reproduce (the tests' tiny random model; each run about 6 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/soak.py --scenario kill      # kill -9 + restart at half time
    .venv/bin/python benchmarks/soak.py --scenario outage    # PostgreSQL denies connections

What it does: a fresh ``KAIZEN_HOME`` (a temporary directory), a database of its own on the
PostgreSQL server at ``--admin-url`` (``CREATE DATABASE kaizen_soak_<random>``, dropped at the
end; nothing else on that server is touched), ``kaizen db upgrade``, one ``ide`` token, then
``kaizen serve`` on 127.0.0.1 and ``--clients`` closed-loop clients for ``--duration`` seconds
(half of the requests streamed, ``max_tokens`` ``--max-tokens``; at most ``--max-requests`` in
all; one token for all of them, with the per-token rate and concurrency limits off). A client
that cannot connect or gets a 503 (the server is restarting) waits 0.2 s before its next try.

* ``kill``: at half time the server process (only it) gets SIGKILL; the script checks that no
  process the server had started is alive 15 s later (``orphans``), then starts the server
  again on the same home, database and journal, and the load goes on.
* ``outage``: at a third of the run the benchmark's database stops accepting connections
  (``ALTER DATABASE ... ALLOW_CONNECTIONS false`` and ``pg_terminate_backend`` of its
  sessions) for ``--outage-seconds``, then accepts them again.

At the end the server gets SIGTERM (it drains its records), and the audit compares: requests
sent; acknowledged (HTTP 200 with a whole JSON body, or a stream that ended in ``data:
[DONE]`` without an error chunk); rows stored; lost (acknowledged, not stored); duplicated
(rows beyond one per id, and records the server found stored already when it replayed its
journal: skipped, so not duplicated); stored but never acknowledged (requests cut by the
kill); errors by status (``transport``: no HTTP answer); 5xx other than 503, and 503s outside
the disruption (from the kill or the outage's start to 5 s after the server is ready again or
the database is back); p50/p99 latency of acknowledged requests. The goal: 0 lost, 0 duplicated,
0 5xx other than 503 (and 503 only during the outage). Results go to
``benchmarks/results/soak-<scenario>-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LOOPBACK,
    REPO_ROOT,
    ServerProcess,
    git_commit,
    kaizen_command,
    percentile,
    resolve_model,
    server_env,
    stream_completion,
    write_results,
)

DEFAULT_ADMIN_URL = os.environ.get(
    "KAIZEN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PROMPTS = [
    "def fib(n):",
    "def is_prime(n):\n    ",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "def reverse_words(s: str) -> str:",
    "# sum of squares\ndef sum_squares(xs):",
]


@dataclass
class Outcome:
    started: float  # seconds since the load began
    latency: float
    status: str  # "200", "503", ..., "transport", "stream_error"
    completion_id: str | None = None
    acknowledged: bool = False


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    # When 503s (and, for the kill, failed connections) are expected: from the kill or the
    # outage's start to 5 s after the server is ready or the database is back.
    disruption: tuple[float, float] | None = None
    orphans: list[str] = field(default_factory=list)
    restart_s: float | None = None


# ------------------------------------------------------------------------------ database


def create_database(admin_url: str) -> tuple[str, str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"kaizen_soak_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def allow_connections(admin_url: str, name: str, allow: bool) -> None:
    """The outage: only the benchmark's own database, never the server."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
        if not allow:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
    admin.dispose()


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def stored_rows(url: str) -> tuple[set[str], int, int]:
    """Ids stored, rows in ``completions``, rows in ``completion_choices``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        ids = set(conn.execute(text("SELECT id FROM completions")).scalars())
        rows = conn.execute(text("SELECT count(*) FROM completions")).scalar() or 0
        choices = conn.execute(text("SELECT count(*) FROM completion_choices")).scalar() or 0
    engine.dispose()
    return ids, int(rows), int(choices)


# ------------------------------------------------------------------------------ load


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], t0: float) -> Outcome:
    started = time.monotonic()
    out = Outcome(started=started - t0, latency=0.0, status="transport")
    if body["stream"]:
        streamed = await stream_completion(client, "/v1/completions", body)
        out.completion_id = streamed.response_id
        out.acknowledged = streamed.ok
        if streamed.status is None or (streamed.status == 200 and streamed.failure == "transport"):
            out.status = "transport"  # no answer, or the answer was cut off
        elif streamed.status == 200 and streamed.failure == "event":
            out.status = "stream_error"
        else:
            out.status = str(streamed.status)
    else:
        try:
            response = await client.post("/v1/completions", json=body)
            out.status = str(response.status_code)
            if response.status_code == 200:
                out.completion_id = response.json()["id"]
                out.acknowledged = True
        except (httpx.HTTPError, json.JSONDecodeError):
            out.acknowledged = False
            if out.status == "200":
                out.status = "transport"  # the answer was cut off
    out.latency = time.monotonic() - started
    return out


async def client_loop(
    index: int,
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    run: Run,
    deadline: float,
    budget: list[int],
    t0: float,
) -> None:
    i = 0
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        body = {
            "model": args.served_name,
            "prompt": PROMPTS[(index + i) % len(PROMPTS)],
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "stream": (index + i) % 2 == 0,
        }
        i += 1
        outcome = await one_request(client, body, t0)
        run.outcomes.append(outcome)
        if outcome.status in ("transport", "503"):  # restarting or loading: as a client would
            await asyncio.sleep(0.2)


def start_server(args: argparse.Namespace, env: dict[str, str], log: Path) -> ServerProcess:
    server = ServerProcess("kaizen", [*kaizen_command(), "serve"], env=env, cwd=REPO_ROOT,
                           log_path=log)  # fmt: skip
    server.wait_ready(f"{args.url}/readyz", timeout=args.ready_timeout)
    return server


async def disrupt(
    args: argparse.Namespace,
    run: Run,
    servers: list[ServerProcess],
    env: dict[str, str],
    log: Path,
    t0: float,
) -> None:
    import psutil

    if args.scenario == "kill":
        await asyncio.sleep(args.duration / 2)
        server = servers[-1]
        children = psutil.Process(server.proc.pid).children(recursive=True)
        run.events.append((time.monotonic() - t0, f"SIGKILL server pid {server.proc.pid}"))
        os.kill(server.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic() - t0
        await asyncio.sleep(15)
        run.orphans = [
            f"{p.pid} {p.name()}"
            for p in children
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        run.events.append((time.monotonic() - t0, f"orphans after 15 s: {len(run.orphans)}"))
        began = time.monotonic()
        servers.append(await asyncio.to_thread(start_server, args, env, log))
        run.restart_s = time.monotonic() - began
        run.events.append((time.monotonic() - t0, f"restarted, ready after {run.restart_s:.1f} s"))
        run.disruption = (killed_at, time.monotonic() - t0 + 5.0)
    elif args.scenario == "outage":
        await asyncio.sleep(args.duration / 3)
        begin = time.monotonic() - t0
        await asyncio.to_thread(allow_connections, args.admin_url, args.db_name, False)
        run.events.append((time.monotonic() - t0, "database denies connections"))
        await asyncio.sleep(args.outage_seconds)
        await asyncio.to_thread(allow_connections, args.admin_url, args.db_name, True)
        end = time.monotonic() - t0
        run.events.append((end, "database accepts connections"))
        # Requests that began just after the end may still meet the old state briefly.
        run.disruption = (begin, end + 5.0)


async def load(
    args: argparse.Namespace, secret: str, servers: list[ServerProcess], env: dict[str, str],
    log: Path,
) -> Run:  # fmt: skip
    run = Run()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    budget = [args.max_requests]
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=args.url,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=httpx.Timeout(120.0, connect=5.0),
        limits=limits,
        trust_env=False,
    ) as client:
        chaos = asyncio.create_task(disrupt(args, run, servers, env, log, t0))
        await asyncio.gather(
            *(client_loop(i, client, args, run, deadline, budget, t0) for i in range(args.clients))
        )
        await chaos
    return run


# ------------------------------------------------------------------------------ audit


def audit(args: argparse.Namespace, run: Run, logs: str) -> dict[str, Any]:
    ids, rows, choices = stored_rows(args.database_url)
    acked = {o.completion_id for o in run.outcomes if o.acknowledged and o.completion_id}
    statuses = Counter(o.status for o in run.outcomes)
    server_errors = {s: n for s, n in statuses.items() if s.startswith("5") and s != "503"}
    outside = 0
    for o in run.outcomes:
        if o.status == "503":
            w = run.disruption
            if w is None or not (w[0] <= o.started <= w[1]):
                outside += 1
    replay_skipped = sum(
        int(n) for n in re.findall(r"event=records_already_stored count=(\d+)", logs)
    )
    replayed = sum(int(n) for n in re.findall(r"event=journal_replay dir=\S+ records=(\d+)", logs))
    latencies = [o.latency for o in run.outcomes if o.acknowledged]
    return {
        "requests": len(run.outcomes),
        "acknowledged": len(acked),
        "rows_stored": rows,
        "choices_stored": choices,
        "lost": len(acked - ids),
        "duplicated": rows - len(ids),
        "stored_never_acknowledged": len(ids - acked),
        "journal_replayed": replayed,
        "replay_already_stored_skipped": replay_skipped,
        "errors_by_status": dict(sorted(statuses.items())),
        "5xx_other_than_503": sum(server_errors.values()),
        "503_outside_disruption": outside,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "orphans_after_kill": run.orphans,
        "restart_ready_s": run.restart_s,
        "events": run.events,
        "lost_ids": sorted(acked - ids)[:20],
    }


def print_table(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print(f"\nsoak: scenario={args.scenario} clients={args.clients} duration={args.duration}s")
    for t, what in result["events"]:
        print(f"  t={t:7.1f}s  {what}")
    keys = [
        "requests", "acknowledged", "rows_stored", "lost", "duplicated",
        "stored_never_acknowledged", "journal_replayed", "replay_already_stored_skipped",
        "5xx_other_than_503", "503_outside_disruption", "p50_latency_s", "p99_latency_s",
    ]  # fmt: skip
    for key in keys:
        value = result[key]
        print(f"  {key:32s} {value:.3f}" if isinstance(value, float) else f"  {key:32s} {value}")
    print(f"  {'errors_by_status':32s} {result['errors_by_status']}")
    if args.scenario == "kill":
        print(f"  {'orphans_after_kill':32s} {result['orphans_after_kill']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scenario", choices=["kill", "outage", "none"], default="kill")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap on requests in all")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--outage-seconds", type=float, default=60.0)
    p.add_argument("--model", default="tiny", help="'tiny', 'bundled' or a model directory")
    p.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="PostgreSQL to create a db on")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the home and the database")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or args.duration > 3600:
        p.error("--clients must be 1..256 and --duration at most 3600 s")
    return args


def main(argv: list[str] | None = None) -> int:
    from server.store.db import make_engine, make_session_factory, upgrade
    from server.store.tokens import Role, create_token

    args = parse_args(argv)
    args.url = f"http://{LOOPBACK}:{args.port}"
    home = Path(tempfile.mkdtemp(prefix="kaizen-soak-"))
    args.db_name, args.database_url = create_database(args.admin_url)
    servers: list[ServerProcess] = []
    try:
        model_dir, args.served_name = resolve_model(args.model, scratch=home)
        upgrade(args.database_url)
        db = make_engine(args.database_url)
        with make_session_factory(db)() as session:
            _, secret = create_token(session=session, name="soak", role=Role.IDE)
        db.dispose()
        tiny = args.model == "tiny"
        env = server_env(
            KAIZEN_HOME=str(home),
            KAIZEN_DATABASE_URL=args.database_url,
            KAIZEN_MODEL=str(model_dir),
            KAIZEN_SERVED_MODEL_NAME=args.served_name,
            KAIZEN_HOST=LOOPBACK,
            KAIZEN_PORT=str(args.port),
            KAIZEN_MAX_MODEL_LEN="512" if tiny else "2048",
            KAIZEN_KV_CACHE_GIB="0.25" if tiny else "2",
            KAIZEN_ENFORCE_EAGER="true" if tiny else "false",
            # One token stands for all the clients: its per-token limits would measure those.
            KAIZEN_RATE_LIMIT_PER_MINUTE="0",
            KAIZEN_MAX_CONCURRENT_PER_TOKEN="0",
        )
        log = home / "server.log"
        servers.append(start_server(args, env, log))
        run = asyncio.run(load(args, secret, servers, env, log))
        servers[-1].stop(timeout=90)
        result = audit(args, run, log.read_text(errors="replace"))
        print_table(args, result)
        path = write_results(
            f"soak-{args.scenario}",
            {"args": {k: v for k, v in vars(args).items() if k != "admin_url"},
             "commit": git_commit(), "result": result},
        )  # fmt: skip
        print(f"\nresults: {path}\nserver log: {log}")
        ok = not result["lost"] and not result["duplicated"] and not result["5xx_other_than_503"]
        return (
            0
            if ok and not result["503_outside_disruption"] and not result["orphans_after_kill"]
            else 1
        )
    finally:
        for server in servers:  # a killed one too: stop() SIGKILLs whatever it left behind
            server.stop(timeout=30)
        if not args.keep:
            drop_database(args.admin_url, args.db_name)


if __name__ == "__main__":
    raise SystemExit(main())
