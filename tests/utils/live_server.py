"""Run the app under a real uvicorn server on a loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

T = TypeVar("T")


@dataclass
class RunningServer:
    url: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coro`` on the server's event loop (e.g. an engine method) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def live_server(app: FastAPI, *, ready_timeout: float = 600.0) -> Iterator[RunningServer]:
    """Serve ``app`` on 127.0.0.1 (a free port); yields once /readyz answers 200.

    Leaving the block asks uvicorn to shut down gracefully, as SIGTERM would, and waits for it.
    """
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(server.serve(),), name="live-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        while httpx.get(f"{url}/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the engine did not become ready")
            if app.state.engine_task.done() and app.state.engine_task.exception():
                raise RuntimeError(
                    "the engine failed to start"
                ) from app.state.engine_task.exception()
            time.sleep(0.2)
        yield RunningServer(url=url, loop=loop)
    finally:
        server.should_exit = True
        thread.join(timeout=120)
        loop.close()


def served_by(url: str, ide_token: str) -> str:
    """Which version a replica serves this token (the fake engine writes it into its text)."""
    response = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {ide_token}"},
        json={"model": "fake-model", "prompt": "x", "max_tokens": 40},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"].split("# ", 1)[1].split("\n", 1)[0]


def converge(url: str, ide_token: str, want: str, *, timeout: float = 15.0) -> None:
    """Wait until the replica at ``url`` serves ``want``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while served_by(url, ide_token) != want:
        assert time.monotonic() < deadline, f"{url} still does not serve {want}"
        time.sleep(0.1)
