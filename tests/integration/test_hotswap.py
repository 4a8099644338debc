"""Hot-swap through each real engine (vLLM with the tiny model; llama.cpp, the CPU default,
with the bundled model), real LoRAs: promotions and a rollback under concurrent streaming load
fail no request and serve each with exactly one version, and each record names the version that
served it; a rollback restores the previous version's greedy output; adapters the engine cannot
serve are refused while serving goes on."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from server.store import registry
from server.store.db import make_engine, make_session_factory
from server.store.models import Completion
from tests.integration.conftest import LiveServer, TinyWorld, serve_tiny

pytestmark = pytest.mark.engine

PROMPT = "def total(items):\n    "
SUFFIX = "\n    return result\n"


def _register(server: LiveServer, name: str, path: Path) -> None:
    db = make_engine(server.settings.database_url)
    with make_session_factory(db)() as session:
        adapter = registry.register_adapter(
            session=session,
            name=name,
            path=str(path),
            base_sha256="-",
            manifest={},
            parent_id=None,
            round_id=None,
            actor="test",
        )
        for state in ("evaluating", "approved"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")
    db.dispose()


def _greedy(server: LiveServer, model: str = "tiny") -> tuple[str, str]:
    """(text, completion id) of the one greedy FIM request every test sends."""
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers["ide"],
        json={
            "model": model,
            "prompt": PROMPT,
            "suffix": SUFFIX,
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.json()["id"]


def _promote(server: LiveServer, name: str, to: str = "active") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/adapters/{name}/promote",
        headers=server.headers["ops"],
        json={"to": to},
        timeout=60,
    )


def _rollback(server: LiveServer) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/rollout/rollback", headers=server.headers["ops"], json={}, timeout=60
    )


@pytest.fixture(
    scope="module", params=["vllm", pytest.param("llama_cpp", marks=pytest.mark.bundled_model)]
)
def world(request: pytest.FixtureRequest) -> TinyWorld:
    """The model and LoRAs of the engine under test."""
    name = "tiny_world" if request.param == "vllm" else "bundled_llama_world"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def swap_server(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve_tiny(world, tmp_path_factory.mktemp("home")) as server:
        assert (
            server.app.state.completion_service.engine.__class__.__name__
            == {
                "vllm": "VllmEngine",
                "llama_cpp": "LlamaCppEngine",
            }[world.engine]
        )
        yield server


@pytest.fixture(scope="module")
def versions(swap_server: LiveServer, world: TinyWorld) -> dict[str, str]:
    """Register two versions and learn each one's greedy text for the test prompt."""
    _register(swap_server, "v-a", world.lora_a)
    _register(swap_server, "v-b", world.lora_b)
    base = _greedy(swap_server)[0]
    assert _promote(swap_server, "v-a").status_code == 200
    a = _greedy(swap_server)[0]
    assert _promote(swap_server, "v-b").status_code == 200
    b = _greedy(swap_server)[0]
    assert len({base, a, b}) == 3, "the tiny LoRAs should each change the greedy output"
    return {"base": base, "v-a": a, "v-b": b}


def test_rollback_restores_the_previous_versions_output(
    swap_server: LiveServer, versions: dict[str, str]
) -> None:
    assert _greedy(swap_server)[0] == versions["v-b"]
    back = _rollback(swap_server)
    assert back.status_code == 200, back.text
    assert back.json()["changes"] == ["retired v-b", "v-a is active again"]
    assert _greedy(swap_server)[0] == versions["v-a"]
    # Promoting a retired version by hand brings the same weights back under the same name.
    again = _promote(swap_server, "v-b")
    assert again.json()["changes"] == ["retired v-a", "v-b is active"], again.text
    assert _greedy(swap_server)[0] == versions["v-b"]


def test_swaps_under_streaming_load_fail_nothing_and_mix_no_versions(
    swap_server: LiveServer, versions: dict[str, str]
) -> None:
    text_to_version = {text: name for name, text in versions.items()}

    async def client_loop(stop: asyncio.Event, out: list[tuple[str, str, bool]]) -> None:
        async with httpx.AsyncClient(
            base_url=swap_server.url, headers=swap_server.headers["ide"], timeout=60
        ) as client:
            while not stop.is_set():
                body = {
                    "model": "tiny",
                    "prompt": PROMPT,
                    "suffix": SUFFIX,
                    "max_tokens": 24,
                    "temperature": 0,
                    "stream": True,
                }
                text, cid, ok = "", "", False
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            ok = True
                            break
                        if line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                break
                            cid = chunk["id"]
                            text += "".join(c["text"] for c in chunk["choices"])
                out.append((cid, text, ok))

    async def scenario() -> list[tuple[str, str, bool]]:
        stop, out = asyncio.Event(), []  # type: ignore[var-annotated]
        clients = [asyncio.create_task(client_loop(stop, out)) for _ in range(4)]
        loop = asyncio.get_running_loop()

        async def served_more(count: int) -> None:
            # Let a few requests finish under each version (an engine that serves one request
            # at a time gets through fewer than one that batches them).
            seen = len(out)
            for _ in range(1200):
                if len(out) >= seen + count:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError("no request finished in two minutes")

        for change in ("v-a", "rollback", "v-a", "rollback"):
            await served_more(2)
            if change == "rollback":
                r = await loop.run_in_executor(None, _rollback, swap_server)
            else:
                r = await loop.run_in_executor(None, _promote, swap_server, change)
            assert r.status_code == 200, r.text
        await served_more(2)
        stop.set()
        await asyncio.gather(*clients)
        return out

    results = asyncio.run(scenario())
    assert len(results) >= 8
    assert all(ok for _, _, ok in results), "a request failed during a swap"
    served = {text_to_version.get(text) for _, text, _ in results}
    assert None not in served, "a text matched no single version: versions were mixed"
    assert {"v-a", "v-b"} <= served
    # The record names the version whose output the client got.
    db = make_engine(swap_server.settings.database_url)
    ids = [cid for cid, _, _ in results]
    with make_session_factory(db)() as session:
        rows = {c.id: c for c in session.scalars(select(Completion).where(Completion.id.in_(ids)))}
    db.dispose()
    for cid, text, _ in results:
        if cid in rows:  # the recorder may still be writing the very last ones
            assert rows[cid].adapter == text_to_version[text]


def test_adapters_the_engine_cannot_serve_are_refused_while_serving_goes_on(
    swap_server: LiveServer, world: TinyWorld, versions: dict[str, str], tmp_path: Path
) -> None:
    current = _greedy(swap_server)[0]
    other_base = tmp_path / "other-base"
    shutil.copytree(world.lora_a, other_base)
    (other_base / "manifest.json").write_text(json.dumps({"base_model": {"sha256": "0" * 64}}))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(world.lora_b, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases = {
        "big": (world.lora_big, "rank 32"),
        "other-base": (other_base, "another base"),
        "corrupt": (corrupt, "shorter than its header says"),
    }
    for name, (path, why) in cases.items():
        _register(swap_server, name, path)
        r = _promote(swap_server, name)
        assert r.status_code == 422 and why in r.json()["error"]["message"], r.text
        assert _greedy(swap_server)[0] == current
    names = {
        m["id"]
        for m in httpx.get(
            f"{swap_server.url}/v1/models", headers=swap_server.headers["ide"]
        ).json()["data"]
    }
    assert not names & set(cases)
