"""A whole round through the real parts, on the tiny model: completions served by vLLM and
recorded, CI outcomes with test code through the API, a round that pairs failures with fixes
and resamples (with vLLM) where a context has only passes, DPO+NLL, a candidate in the registry,
and that candidate loaded by the running server and serving a request."""

from __future__ import annotations

import httpx
import pytest
import torch

from server.store import registry
from server.store.db import make_engine, make_session_factory
from tests.integration.conftest import LiveServer, TinyWorld
from trainer.config import TrainConfig
from trainer.generate import VllmGenerator
from trainer.round import RoundOptions, run_round

pytestmark = pytest.mark.engine

# (name, correct body, test): the tiny random model never writes these, so its texts fail.
TASKS = [
    ("add", "    return a + b\n", "assert add(2, 3) == 5\n"),
    ("sub", "    return a - b\n", "assert sub(5, 3) == 2\n"),
    ("mul", "    return a * b\n", "assert mul(2, 4) == 8\n"),
    ("big", "    return max(a, b)\n", "assert big(1, 9) == 9\n"),
    ("small", "    return min(a, b)\n", "assert small(1, 9) == 1\n"),
]
SUFFIX = "\n"


def _complete(server: LiveServer, name: str) -> tuple[str, str]:
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers["ide"],
        json={
            "model": "tiny",
            "prompt": f"def {name}(a, b):\n",
            "suffix": SUFFIX,
            "max_tokens": 12,
            "temperature": 0,
            "context": {"language": "python", "file_path": "m.py", "repository": "acme/m"},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["id"], r.json()["choices"][0]["text"]


def _report(server: LiveServer, run: str, cid: str, text: str, status: str, test: str) -> None:
    r = httpx.post(
        f"{server.url}/v1/outcomes",
        headers=server.headers["ci"],
        json={
            "run_id": run,
            "repository": "acme/m",
            "commit": "c1",
            "status": status,
            "completions": [
                {
                    "completion_id": cid,
                    "file_path": "m.py",
                    "final_text": text,
                    "status": status,
                    "test_code": test,
                }
            ],
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["completions"] == 1, r.text


def test_records_to_a_served_candidate(
    tiny_server: LiveServer, tiny_world: TinyWorld, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for i, (name, good, test) in enumerate(TASKS):
        cid, text = _complete(tiny_server, name)
        if i < 3:  # the model's text failed, the developer fixed it, CI passed the fix
            # The random model's texts run to max_tokens, and a text cut off there is never a
            # training side as it stands: here the developer finished the line by hand (still
            # wrong) before CI ran it.
            _report(tiny_server, f"ci:{name}:1", cid, f"{text}  # wip\n", "failed", test)
            _report(tiny_server, f"ci:{name}:2", cid, good, "passed", test)
        else:  # edited before CI: only a pass is known, the round resamples for failures
            _report(tiny_server, f"ci:{name}:1", cid, good, "passed", test)

    db = make_engine(tiny_server.settings.database_url)
    factory = make_session_factory(db)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_round(
            session_factory=factory,
            base_model_dir=tiny_world.model_dir,
            rounds_dir=tmp_path_factory.mktemp("rounds"),
            config=TrainConfig(
                batch_size=4,
                max_steps=4,
                warmup_steps=0,
                learning_rate=2e-2,
                lora_r=8,
                lora_alpha=16,
                max_length=128,
                gradient_checkpointing=False,
            ),
            # The random model's texts are noise, so every fix rewrites them whole: no fix
            # bound here (tests/trainer/test_pairs.py tests the bound).
            options=RoundOptions(n_resample=2, select=False, min_pairs=2, max_fix_distance=1.0),
            generator_factory=lambda: VllmGenerator(
                tiny_world.model_dir, max_model_len=512, kv_cache_gib=0.0625, enforce_eager=True
            ),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert report.status == "succeeded", report.error
    pairs = report.funnel["pairs"]
    assert pairs["pairs_by_source"]["fix"] == 3
    assert pairs["contexts_resampled"] == 2
    # Resampled through vLLM with the recorded request; samples the random model cut off at
    # max_tokens are counted and never paired, the others pair with the passes.
    resampling = pairs["resampling"]
    assert resampling["samples"] == 2 * 2
    resample_pairs = pairs["pairs_by_source"].get("resample", 0)
    assert resample_pairs >= 1 or resampling["samples_cut_off"] == resampling["samples"]
    assert report.funnel["trained_pairs"] == pairs["pairs"]

    with factory() as session:
        adapter = registry.get_adapter(session=session, name=report.adapter_name or "")
        assert adapter is not None and adapter.state == "candidate"
        for state in ("evaluating", "approved"):  # the gate is tested on its own
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")
    db.dispose()

    base_text = _complete(tiny_server, "add")[1]
    promoted = httpx.post(
        f"{tiny_server.url}/v1/adapters/{report.adapter_name}/promote",
        headers=tiny_server.headers["ops"],
        json={"to": "active"},
        timeout=60,
    )
    assert promoted.status_code == 200, promoted.text
    r = httpx.post(
        f"{tiny_server.url}/v1/completions",
        headers=tiny_server.headers["ide"],
        json={
            "model": "tiny",
            "prompt": "def add(a, b):\n",
            "suffix": SUFFIX,
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["X-Kaizen-Adapter"] == report.adapter_name
    assert r.json()["choices"][0]["text"] != base_text  # the trained weights are in use
