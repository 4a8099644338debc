"""The real vLLM engine with a tiny random Qwen2 model and two LoRA adapters built by the tests.

One server (uvicorn on loopback, the real app, the real engine) is shared by the tests of a
module, since an engine takes ~15 s to start on two cores.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import FastAPI

from server.app import create_app
from server.config import Settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from tests.utils.live_server import RunningServer, live_server
from tests.utils.tiny_model import build_random_lora, build_tiny_model


@dataclass
class TinyWorld:
    model_dir: Path
    lora_a: Path
    lora_b: Path
    lora_big: Path  # rank 32: over the engine's limit of 16
    # Settings that differ from the tiny model's on vLLM (the bundled model on llama.cpp).
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def engine(self) -> str:
        return str(self.settings.get("engine", "vllm"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model")
    return TinyWorld(
        model_dir=model_dir,
        lora_a=build_random_lora(model_dir, root / "lora-a", seed=1),
        lora_b=build_random_lora(model_dir, root / "lora-b", seed=2),
        lora_big=build_random_lora(model_dir, root / "lora-big", rank=32, seed=3),
    )


@pytest.fixture(scope="session")
def bundled_llama_world(
    bundled_model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> TinyWorld:
    """The CPU default: the bundled model on the llama.cpp engine, with LoRAs of its shape."""
    from server.model_prep import ensure_bundled_gguf, prepare_bundled_model

    model_dir = prepare_bundled_model(bundled_model_cache)
    ensure_bundled_gguf(bundled_model_cache)
    root = tmp_path_factory.mktemp("bundled")
    return TinyWorld(
        model_dir=model_dir,
        lora_a=build_random_lora(model_dir, root / "lora-a", seed=1),
        lora_b=build_random_lora(model_dir, root / "lora-b", seed=2),
        lora_big=build_random_lora(model_dir, root / "lora-big", rank=32, seed=3),
        settings={
            "model": "bundled",
            "model_cache": bundled_model_cache,
            "engine": "llama_cpp",
            "kv_cache_gib": 0.5,
            "enforce_eager": False,
        },
    )


def tiny_settings(home: Path, world: TinyWorld, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "database_url": f"sqlite:///{home / 'kaizen.db'}",
        "model": str(world.model_dir),
        "served_model_name": "tiny",
        "adapters": {"lora-a": world.lora_a},
        "max_model_len": 512,
        "kv_cache_gib": 0.0625,
        "enforce_eager": True,
        "max_tokens_limit": 256,
        "default_max_tokens": 16,
        "auth_cache_seconds": 0,
    }
    values.update(world.settings)
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@dataclass
class LiveServer:
    server: RunningServer
    app: FastAPI
    settings: Settings
    headers: dict[str, dict[str, str]]  # per role

    @property
    def url(self) -> str:
        return self.server.url

    def secret(self, role: str) -> str:
        return self.headers[role]["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def tiny_server(
    tiny_world: TinyWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    with serve_tiny(tiny_world, tmp_path_factory.mktemp("home")) as server:
        yield server


@contextlib.contextmanager
def serve_tiny(
    tiny_world: TinyWorld, home: Path, **settings_overrides: object
) -> Iterator[LiveServer]:
    """A live server on the tiny model in ``home``, with a token of each role."""
    settings = tiny_settings(home, tiny_world, **settings_overrides)
    upgrade(settings.database_url)
    db = make_engine(settings.database_url)
    with make_session_factory(db)() as session:
        headers = {
            role.value: {
                "Authorization": "Bearer "
                + create_token(session=session, name=role.value, role=role)[1]
            }
            for role in Role
        }
    db.dispose()
    app = create_app(settings)
    with live_server(app) as server:
        yield LiveServer(server=server, app=app, settings=settings, headers=headers)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """`kaizen serve` as a real process (the tiny model, loopback), with its log."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        """Until /readyz answers 200. Generous: on a shared two-core machine another engine may
        be compiling or serving at the same time, so a start can take several minutes."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)


def start_server_process(
    world: TinyWorld, home: Path, db_url: str, log_name: str = "server.log", **env: str
) -> ServerProcess:
    port = free_port()
    full_env = {
        **os.environ,
        "KAIZEN_HOME": str(home),
        "KAIZEN_DATABASE_URL": db_url,
        "KAIZEN_MODEL": str(world.model_dir),
        "KAIZEN_SERVED_MODEL_NAME": "tiny",
        "KAIZEN_PORT": str(port),
        "KAIZEN_MAX_MODEL_LEN": "512",
        "KAIZEN_KV_CACHE_GIB": "0.0625",
        "KAIZEN_ENFORCE_EAGER": "true",
        "KAIZEN_MAX_TOKENS_LIMIT": "256",
        **env,
    }
    log_path = home / log_name
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaizen", "serve"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path, env=full_env)
