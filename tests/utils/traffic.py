"""Mixed client traffic against a live server: plain, FIM, chat, streamed, and streams the client
abandons mid-way. Each request returns its completion id and the status its record must have."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

KINDS = ("plain", "fim", "chat", "stream", "hangup")


async def _plain(client: httpx.AsyncClient, i: int, model: str, adapter: str) -> tuple[str, str]:
    r = await client.post(
        "/v1/completions", json={"model": model, "prompt": f"p{i}", "max_tokens": 8}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _fim(client: httpx.AsyncClient, i: int, model: str, adapter: str) -> tuple[str, str]:
    r = await client.post(
        "/v1/completions",
        json={
            "model": adapter,
            "prompt": f"def f{i}():\n    ",
            "suffix": "\n    return x\n",
            "max_tokens": 30,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _chat(client: httpx.AsyncClient, i: int, model: str, adapter: str) -> tuple[str, str]:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], "completed"


async def _stream(client: httpx.AsyncClient, i: int, model: str, hang_up: bool) -> tuple[str, str]:
    # A hung-up stream asks for 200 tokens so that it cannot finish before the client leaves.
    body = {"model": model, "prompt": f"s{i}", "max_tokens": 200 if hang_up else 20, "stream": True}
    completion_id = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                completion_id = json.loads(line[6:])["id"]
                if hang_up:
                    break  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                break
    return completion_id, "aborted" if hang_up else "completed"


def random_kinds(n: int, seed: int = 7) -> list[str]:
    return random.Random(seed).choices(KINDS, k=n)


async def run_traffic(
    url: str,
    headers: dict[str, str],
    kinds: list[str],
    *,
    model: str,
    adapter: str,
    concurrency: int = 20,
) -> list[tuple[str, str]]:
    """Send one request per kind, ``concurrency`` at a time; returns (id, expected status)."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=120
    ) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, kind: str) -> tuple[str, str]:
            async with sem:
                if kind in ("stream", "hangup"):
                    return await _stream(client, i, model, hang_up=kind == "hangup")
                send = {"plain": _plain, "fim": _fim, "chat": _chat}[kind]
                return await send(client, i, model, adapter)

        return await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
