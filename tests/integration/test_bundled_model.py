"""The bundled model (Qwen2.5-Coder-0.5B-Instruct) served end to end: one short FIM completion,
on each engine (llama.cpp, the CPU default, on its GGUF; vLLM on the bfloat16 checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.store.completions import get_completion
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from tests.utils.live_server import live_server

pytestmark = [pytest.mark.bundled_model, pytest.mark.timeout(3600)]


@pytest.mark.parametrize("engine", ["auto", "vllm"])
def test_bundled_model_completes_a_fim_prompt(
    bundled_model_cache: Path, tmp_path: Path, engine: str
) -> None:
    settings = Settings(
        _env_file=None,
        home=tmp_path,
        model="bundled",  # type: ignore[call-arg]
        model_cache=bundled_model_cache,
        kv_cache_gib=0.5,
        engine=engine,
    )
    upgrade(settings.database_url)
    db = make_engine(settings.database_url)
    with make_session_factory(db)() as session:
        _, secret = create_token(session=session, name="ide", role=Role.IDE)
    app = create_app(settings)
    expected = "LlamaCppEngine" if engine == "auto" else "VllmEngine"  # auto: this CPU host
    with live_server(app) as server:
        assert type(app.state.completion_service.engine).__name__ == expected
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["qwen2.5-coder-0.5b-instruct"]
        response = client.completions.create(
            model="qwen2.5-coder-0.5b-instruct",
            prompt="def add(a, b):\n    return ",
            suffix="\n\n\nprint(add(1, 2))\n",
            max_tokens=8,
            temperature=0,
        )
    text = response.choices[0].text
    assert re.search(r"a\s*\+\s*b", text), text
    assert "print(add" not in text  # cut before the model repeats the suffix
    with make_session_factory(db)() as session:
        row = get_completion(session=session, completion_id=response.id)
        assert row is not None and row.choices[0].text == text and row.status == "completed"
    db.dispose()
