"""deploy/compose.yaml, checked without Docker: valid against the Compose specification's JSON
schema (the copy that ships in the ``check-jsonschema`` package), and saying what Kaizen needs
(every ``KAIZEN_*`` name a real setting, one database and one adapter store for every replica
and the trainer, a migration before them, health checks behind every ``service_healthy``, each
replica on its own disk and GPUs, a balancer over all of them).

Every check is a function returning what is wrong, so that each is also run against a copy of
the file broken on purpose: a check that cannot fail is caught here too."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
SETTINGS = {f"KAIZEN_{name.upper()}" for name in Settings.model_fields}
SHARED = (
    "KAIZEN_DATABASE_URL",
    "KAIZEN_ADAPTER_STORE",
    "KAIZEN_ADAPTER_STORE_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

Doc = dict[str, Any]


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def load() -> tuple[Doc, str]:
    text = COMPOSE.read_text()
    return yaml.safe_load(text), text


# --- reading services


def command(service: Doc) -> list[str]:
    """What the container runs: its entrypoint (when it replaces the image's) and command."""
    words: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        words += value.split() if isinstance(value, str) else [str(v) for v in value]
    return words


def environment(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def host_of(url: str) -> str | None:
    """The host of a URL whose parts may be ``${VAR:?message}`` (interpolated by Compose)."""
    return urlsplit(re.sub(r"\$\{[^}]*\}", "x", url)).hostname


def depends_on(service: Doc) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def is_kaizen(service: Doc, words: tuple[str, ...]) -> bool:
    cmd = command(service)
    return cmd[: len(words)] == list(words)


def replicas(doc: Doc) -> dict[str, Doc]:
    return {n: s for n, s in doc["services"].items() if is_kaizen(s, ("kaizen", "serve"))}


def workers(doc: Doc) -> dict[str, Doc]:
    return {
        n: s
        for n, s in doc["services"].items()
        if is_kaizen(s, ("kaizen", "train")) and "--watch" in command(s)
    }


def migrations(doc: Doc) -> dict[str, Doc]:
    return {n: s for n, s in doc["services"].items() if command(s) == ["kaizen", "db", "upgrade"]}


def data_volume(service: Doc) -> str | None:
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = (volume.split(":") + [""])[:2]
        else:
            source, target = volume.get("source"), volume.get("target")
        if target == "/data":
            return source
    return None


# --- the checks


def schema_problems(doc: Doc, text: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"schema: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


_DOLLAR = re.compile(r"\$(\$|\{[A-Za-z_][A-Za-z0-9_]*(?:[:?\-+][^}]*)?\}|[A-Za-z_]\w*)?")


def interpolation_problems(doc: Doc, text: str) -> list[str]:
    """Compose interpolates ``$NAME`` and ``${NAME...}`` everywhere: a literal ``$`` (nginx's
    ``$host``) must be ``$$``. Variables are only taken as ``${NAME...}``."""
    found = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for match in _DOLLAR.finditer(code):
            token = match.group(1)
            if token is None or not (token == "$" or token.startswith("{")):
                found.append(f"line {line_no}: {match.group(0)!r} would be interpolated")
    return found


def setting_problems(doc: Doc, text: str) -> list[str]:
    """Every KAIZEN_* name in the file, comments included, is a setting Kaizen reads."""
    names = set(re.findall(r"\bKAIZEN_[A-Z0-9_]*[A-Z0-9]", text))
    return [f"{name} is not a field of server.config.Settings" for name in sorted(names - SETTINGS)]


def topology_problems(doc: Doc, text: str) -> list[str]:
    services: dict[str, Doc] = doc.get("services") or {}
    found: list[str] = []
    serving, training, migrate = replicas(doc), workers(doc), migrations(doc)
    if len(serving) < 2:
        found.append(f"{len(serving)} `kaizen serve` replicas; scaling out needs 2 or more")
    if len(training) != 1:
        found.append(f"{len(training)} `kaizen train --watch` workers; want 1")
    if len(migrate) != 1:
        found.append(f"{len(migrate)} `kaizen db upgrade` services; want 1")
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            if dep not in services:
                found.append(f"{name} depends on {dep}, which is not a service")
            elif condition == "service_healthy" and not services[dep].get("healthcheck"):
                found.append(f"{name} waits for {dep} to be healthy; {dep} has no healthcheck")
    kaizen = {**serving, **training}
    for name, service in kaizen.items():
        deps = depends_on(service)
        for m in migrate:
            if deps.get(m) != "service_completed_successfully":
                found.append(f"{name} does not wait for the migration {m} to complete")
        env = environment(service)
        for key in SHARED:
            if not env.get(key):
                found.append(f"{name} has no {key}")
        url = env.get("KAIZEN_DATABASE_URL", "")
        if not url.startswith("postgresql"):
            found.append(f"{name}: KAIZEN_DATABASE_URL is not PostgreSQL ({url!r})")
        host = host_of(url)
        if host and host not in services:
            found.append(f"{name}: the database host {host} is not a service")
        elif host and deps.get(host) != "service_healthy":
            found.append(f"{name} does not wait for the database {host} to be healthy")
        if not env.get("KAIZEN_ADAPTER_STORE", "").startswith("s3://"):
            found.append(f"{name}: KAIZEN_ADAPTER_STORE is not an s3:// store")
        endpoint = host_of(env.get("KAIZEN_ADAPTER_STORE_ENDPOINT_URL", ""))
        if endpoint and endpoint not in services:
            found.append(f"{name}: the store endpoint {endpoint} is not a service")
        elif endpoint and deps.get(endpoint) != "service_healthy":
            found.append(f"{name} does not wait for the store {endpoint} to be healthy")
    for m, service in migrate.items():
        for key in ("KAIZEN_DATABASE_URL",):
            for name, other in kaizen.items():
                if environment(service).get(key) != environment(other).get(key):
                    found.append(f"{m} migrates another database than {name} uses")
        if service.get("restart", "no") != "no":
            found.append(f"{m} is restarted; a migration runs once")
    for key in SHARED:
        values = {environment(s).get(key) for s in kaizen.values()}
        if len(values) > 1:
            found.append(
                f"the replicas and the trainer disagree on {key}: {sorted(map(str, values))}"
            )
    # Each Kaizen process on its own disk (no shared volume), with its own adapter cache.
    disks: dict[str, str] = {}
    for name, service in kaizen.items():
        volume = data_volume(service)
        if volume is None:
            found.append(f"{name} has no volume at /data")
        elif volume in disks:
            found.append(f"{name} and {disks[volume]} share the volume {volume}")
        else:
            disks[volume] = name
    for name, service in serving.items():
        env = environment(service)
        if not env.get("KAIZEN_ADAPTER_CACHE_DIR", "").startswith("/data/"):
            found.append(f"{name}: KAIZEN_ADAPTER_CACHE_DIR is not on its own /data volume")
        if service.get("ports"):
            found.append(f"{name} publishes ports; clients go through the balancer")
        health = " ".join(map(str, (service.get("healthcheck") or {}).get("test", [])))
        if "/readyz" not in health:
            found.append(f"{name} has no health check on /readyz")
        devices = [
            d
            for d in service.get("deploy", {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices", [])
            if "gpu" in d.get("capabilities", [])
        ]
        gpus = sum(len(d.get("device_ids", [])) or int(d.get("count", 0)) for d in devices)
        tp = int(env.get("KAIZEN_TENSOR_PARALLEL_SIZE", "1"))
        if gpus != tp:
            found.append(f"{name} reserves {gpus} GPUs for KAIZEN_TENSOR_PARALLEL_SIZE={tp}")
        if "KAIZEN_GPU_MEMORY_UTILIZATION" not in env:
            found.append(f"{name} does not set KAIZEN_GPU_MEMORY_UTILIZATION")
    ids = [
        (name, i)
        for name, service in kaizen.items()
        for d in service.get("deploy", {})
        .get("resources", {})
        .get("reservations", {})
        .get("devices", [])
        for i in d.get("device_ids", [])
    ]
    seen: dict[str, str] = {}
    for name, i in ids:
        if i in seen:
            found.append(f"{name} and {seen[i]} reserve the same GPU {i}")
        seen[i] = name
    # The balancer: the one published port, in front of every replica once it is healthy.
    balancers = {n: s for n, s in services.items() if s.get("ports")}
    if len(balancers) != 1:
        found.append(f"{len(balancers)} services publish ports; want the balancer only")
    configs = "\n".join(str(c.get("content", "")) for c in (doc.get("configs") or {}).values())
    for b, service in balancers.items():
        deps = depends_on(service)
        for name in serving:
            if deps.get(name) != "service_healthy":
                found.append(f"the balancer {b} does not wait for {name} to be healthy")
            if not re.search(rf"server\s+{re.escape(name)}:8000\b", configs):
                found.append(f"the balancer's upstream does not list {name}:8000")
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                found.append(f"{name}: no {build.get('dockerfile')} in {context}")
    return found


CHECKS = (schema_problems, interpolation_problems, setting_problems, topology_problems)


def all_problems(doc: Doc, text: str) -> list[str]:
    return [p for check in CHECKS for p in check(doc, text)]


# --- the file as it is


def test_the_compose_file_parses_and_is_valid_against_the_compose_specification() -> None:
    doc, text = load()
    assert set(doc["services"]) >= {"postgres", "store", "migrate", "trainer", "balancer"}
    assert schema_problems(doc, text) == []


def test_no_literal_dollar_is_left_to_interpolation() -> None:
    assert interpolation_problems(*load()) == []


def test_every_kaizen_variable_is_a_real_setting() -> None:
    doc, text = load()
    assert setting_problems(doc, text) == []
    used = {k for s in doc["services"].values() for k in environment(s) if k.startswith("KAIZEN")}
    # The ones scaling out is about are all there.
    assert used >= {
        "KAIZEN_DATABASE_URL",
        "KAIZEN_ADAPTER_STORE",
        "KAIZEN_ADAPTER_STORE_ENDPOINT_URL",
        "KAIZEN_ADAPTER_CACHE_DIR",
        "KAIZEN_GPU_MEMORY_UTILIZATION",
        "KAIZEN_TENSOR_PARALLEL_SIZE",
        "KAIZEN_ROLLOUT_POLL_SECONDS",
    }


def test_the_topology_replicas_worker_database_store_migration_balancer() -> None:
    doc, text = load()
    assert topology_problems(doc, text) == []
    assert len(replicas(doc)) == 2 and list(workers(doc)) == ["trainer"]


def test_the_commands_the_services_run_exist() -> None:
    from kaizen.cli import app

    doc, _ = load()
    runner = CliRunner()
    for name, service in doc["services"].items():
        cmd = command(service)
        if cmd[:1] == ["kaizen"]:
            result = runner.invoke(app, [*cmd[1:], "--help"])
            assert result.exit_code == 0, f"{name}: {' '.join(cmd)}: {result.output}"


# --- the checks can fail: each broken copy is caught


def _services(doc: Doc) -> dict[str, Doc]:
    return doc["services"]


def _env(doc: Doc, service: str) -> dict[str, Any]:
    return _services(doc)[service]["environment"]


BREAKAGES: dict[str, tuple[Any, str]] = {
    "an unknown service key": (
        lambda d, t: _services(d)["replica-1"].__setitem__("gpus_please", 1),
        "schema:",
    ),
    "a healthcheck with a number for a test": (
        lambda d, t: _services(d)["postgres"]["healthcheck"].__setitem__("test", 5),
        "schema:",
    ),
    "a made-up KAIZEN_ variable": (
        lambda d, t: t.replace("KAIZEN_LOG_LEVEL", "KAIZEN_LOGLEVEL"),
        "KAIZEN_LOGLEVEL is not a field",
    ),
    "nginx's $host unescaped": (
        lambda d, t: t.replace("$$host", "$host"),
        "'$host' would be interpolated",
    ),
    "a replica on another database": (
        lambda d, t: _env(d, "replica-2").__setitem__(
            "KAIZEN_DATABASE_URL", "postgresql+psycopg://kaizen@postgres:5432/other"
        ),
        "disagree on KAIZEN_DATABASE_URL",
    ),
    "the trainer on another store": (
        lambda d, t: _env(d, "trainer").__setitem__("KAIZEN_ADAPTER_STORE", "s3://elsewhere/x"),
        "disagree on KAIZEN_ADAPTER_STORE",
    ),
    "a replica on SQLite": (
        lambda d, t: [
            _env(d, n).__setitem__("KAIZEN_DATABASE_URL", "sqlite:////data/kaizen.db")
            for n in ("replica-1", "replica-2", "trainer", "migrate")
        ],
        "KAIZEN_DATABASE_URL is not PostgreSQL",
    ),
    "a replica depending on a missing service": (
        lambda d, t: _services(d)["replica-1"]["depends_on"].__setitem__(
            "redis", {"condition": "service_started"}
        ),
        "depends on redis, which is not a service",
    ),
    "no migration step": (
        lambda d, t: (
            [_services(d).pop("migrate")]
            + [
                s["depends_on"].pop("migrate", None)
                for s in _services(d).values()
                if "depends_on" in s
            ]
        ),
        "`kaizen db upgrade` services",
    ),
    "a replica not waiting for the migration": (
        lambda d, t: _services(d)["replica-2"]["depends_on"].pop("migrate"),
        "replica-2 does not wait for the migration",
    ),
    "service_healthy on a service with no healthcheck": (
        lambda d, t: _services(d)["store"].pop("healthcheck"),
        "store has no healthcheck",
    ),
    "two replicas on one volume": (
        lambda d, t: _services(d)["replica-2"].__setitem__("volumes", ["replica-1-data:/data"]),
        "share the volume replica-1-data",
    ),
    "one replica left": (
        lambda d, t: _services(d).pop("replica-2"),
        "1 `kaizen serve` replicas",
    ),
    "a replica published past the balancer": (
        lambda d, t: _services(d)["replica-1"].__setitem__("ports", ["8001:8000"]),
        "replica-1 publishes ports",
    ),
    "tensor parallel 2 on one GPU": (
        lambda d, t: _env(d, "replica-1").__setitem__("KAIZEN_TENSOR_PARALLEL_SIZE", "2"),
        "reserves 1 GPUs for KAIZEN_TENSOR_PARALLEL_SIZE=2",
    ),
    "a balancer that forgets a replica": (
        lambda d, t: d["configs"]["balancer"].__setitem__(
            "content", d["configs"]["balancer"]["content"].replace("server replica-2:8000", "")
        ),
        "does not list replica-2:8000",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_copy_is_caught(breakage: str) -> None:
    doc, text = load()
    # YAML anchors make services share mappings (one environment): break an unshared copy.
    doc = json.loads(json.dumps(doc))
    assert all_problems(doc, text) == [], "the copy must be clean before it is broken"
    change, expected = BREAKAGES[breakage]
    result = change(doc, text)
    if isinstance(result, str):  # a change of the text: parse it again
        text, doc = result, yaml.safe_load(result)
    problems = all_problems(doc, text)
    assert any(expected in p for p in problems), problems


# --- the one-off steps' own scripts


def test_the_bucket_step_creates_the_bucket_once_against_a_real_s3_server(
    s3: Any, aws_env: dict[str, str]
) -> None:
    """store-init's script (run by python3 -c in the image) against moto's server: it creates
    the bucket KAIZEN_ADAPTER_STORE names, and a second run (a restart) changes nothing."""
    import os
    import subprocess
    import sys

    doc, _ = load()
    service = doc["services"]["store-init"]
    assert service["entrypoint"] == ["python3", "-c"]
    script = service["command"][0]
    bucket = f"kaizen-init-{os.getpid()}"
    env = {
        **os.environ,
        **aws_env,
        "KAIZEN_ADAPTER_STORE": f"s3://{bucket}/adapters",
        "KAIZEN_ADAPTER_STORE_ENDPOINT_URL": s3.endpoint_url,
    }
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    names = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert names.count(bucket) == 1
