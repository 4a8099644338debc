"""Run the app under a real uvicorn server on a loopback port, in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI


@contextmanager
def live_server(app: FastAPI, *, ready_timeout: float = 600.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port); yields the base URL once /readyz is 200.

    Leaving the block asks uvicorn to shut down gracefully, as SIGTERM would.
    """
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
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
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=120)
