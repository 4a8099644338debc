"""The llama.cpp engine on the bundled model's GGUF, with LoRA adapters trained the way PEFT
saves them: the converted adapter changes the logits as PEFT's does on the checkpoint, and the
engine streams, stops, samples, switches adapters, removes them under a running request and
cancels like the service expects of any engine."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.config import Settings
from server.engine.base import ChoiceDelta, GenerationParams, UnknownAdapterError
from server.engine.gguf_lora import convert_peft_lora
from server.engine.llama_engine import PREFIX_STATES, LlamaCppEngine, PrefixStates
from server.engine.lora import AdapterRejectedError
from server.model_prep import ensure_bundled_gguf, prepare_bundled_model
from tests.utils.tiny_model import build_random_lora

pytestmark = [pytest.mark.bundled_model, pytest.mark.timeout(1800)]

PROMPT = (
    "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n\n\nprint(add(1, 2))\n<|fim_middle|>"
)
LONG = "<|fim_prefix|>def fibonacci(n):\n    <|fim_suffix|>\n<|fim_middle|>"


@dataclass
class Bundled:
    model_dir: Path
    gguf: Path
    lora_small: Path  # a small random LoRA: compared with PEFT's forward pass
    lora_a: Path  # large enough to change the greedy output
    lora_big: Path  # rank 32, over the engine's limit


@pytest.fixture(scope="module")
def bundled(bundled_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundled:
    model_dir = prepare_bundled_model(bundled_model_cache)
    root = tmp_path_factory.mktemp("bundled-loras")
    return Bundled(
        model_dir=model_dir,
        gguf=ensure_bundled_gguf(bundled_model_cache),
        lora_small=build_random_lora(model_dir, root / "small", rank=8, seed=1, scale=0.02),
        lora_a=build_random_lora(model_dir, root / "a", rank=8, seed=2, scale=0.5),
        lora_big=build_random_lora(model_dir, root / "big", rank=32, seed=3, scale=0.02),
    )


@pytest.fixture(scope="module")
def engine(
    bundled: Bundled, bundled_model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaCppEngine]:
    settings = Settings(
        _env_file=None,
        home=tmp_path_factory.mktemp("home"),
        model="bundled",  # type: ignore[call-arg]
        model_cache=bundled_model_cache,
        engine="llama_cpp",
        max_model_len=1024,
    )
    engine = LlamaCppEngine(settings)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


def _last_logits(llama: object, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llama.reset()  # type: ignore[attr-defined]
    llama.eval(ids)  # type: ignore[attr-defined]
    ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)  # type: ignore[attr-defined]
    return np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)).copy()  # type: ignore[attr-defined]


def test_a_converted_lora_moves_the_logits_as_peft_does(bundled: Bundled, tmp_path: Path) -> None:
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled.model_dir)
    ids = tokenizer.encode(
        "def fibonacci(n):\n    if n < 2:\n        return", add_special_tokens=False
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bundled.model_dir, dtype=torch.float32),
        str(bundled.lora_small),
    )
    with torch.no_grad():
        with model.disable_adapter():
            hf_base = model(torch.tensor([ids])).logits[0, -1].numpy()
        hf_lora = model(torch.tensor([ids])).logits[0, -1].numpy()
    del model

    converted = convert_peft_lora(bundled.lora_small, tmp_path / "a.gguf", architecture="qwen2")
    llama = llama_cpp.Llama(model_path=str(bundled.gguf), n_ctx=256, n_threads=2, verbose=False)
    try:
        base = _last_logits(llama, ids)
        handle = llama_cpp.llama_adapter_lora_init(llama.model, str(converted).encode())
        assert handle, "llama.cpp refused the converted adapter"
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        assert (
            llama_cpp.llama_set_adapters_lora(llama.ctx, handles, 1, (ctypes.c_float * 1)(1.0)) == 0
        )
        adapted = _last_logits(llama, ids)
    finally:
        llama.close()

    hf_delta, delta = hf_lora - hf_base, adapted - base
    assert np.linalg.norm(delta) > 0, "the adapter changed nothing"
    cosine = float(hf_delta @ delta / np.linalg.norm(hf_delta) / np.linalg.norm(delta))
    # The GGUF is 4-bit and the checkpoint bfloat16, so not equal; but the adapter's effect must
    # point the same way with the same size (a wrong name map, transpose or scale would not).
    assert cosine > 0.95, cosine
    assert 0.8 < float(np.linalg.norm(delta) / np.linalg.norm(hf_delta)) < 1.25


async def _collect(
    engine: LlamaCppEngine, prompt: str, adapter: str | None = None, **params: object
) -> list[ChoiceDelta]:
    values: dict[str, object] = {"max_tokens": 16, "temperature": 0.0}
    values.update(params)
    out: list[ChoiceDelta] = []
    async for deltas in engine.generate(
        request_id="t",
        prompt_token_ids=engine.tokenize(prompt),
        params=GenerationParams(**values),  # type: ignore[arg-type]
        adapter=adapter,
    ):
        out.extend(deltas)
    return out


def _text(deltas: list[ChoiceDelta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


def test_greedy_fim_stops_at_the_stop_string_and_repeats(engine: LlamaCppEngine) -> None:
    deltas = asyncio.run(_collect(engine, PROMPT, stop=["\n"], max_tokens=32))
    text = _text(deltas)
    assert "a + b" in text and "\n" not in text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "\n"
    assert sum(d.token_count for d in deltas) >= 3
    # The same request again (the cached prefix reused), and after another prompt.
    assert _text(asyncio.run(_collect(engine, PROMPT, stop=["\n"], max_tokens=32))) == text
    asyncio.run(_collect(engine, LONG))
    assert _text(asyncio.run(_collect(engine, PROMPT, stop=["\n"], max_tokens=32))) == text


def test_max_tokens_ends_with_length(engine: LlamaCppEngine) -> None:
    deltas = asyncio.run(_collect(engine, LONG, max_tokens=5))
    assert deltas[-1].finish_reason == "length"
    assert sum(d.token_count for d in deltas) == 5


def test_seeded_sampling_repeats_and_choices_differ(engine: LlamaCppEngine) -> None:
    params = {"temperature": 1.0, "n": 3, "seed": 7, "max_tokens": 12}
    first = asyncio.run(_collect(engine, LONG, **params))
    again = asyncio.run(_collect(engine, LONG, **params))
    texts = [_text(first, i) for i in range(3)]
    assert texts == [_text(again, i) for i in range(3)]
    assert len(set(texts)) > 1
    assert {d.index for d in first if d.finish_reason} == {0, 1, 2}


def test_adapters_change_the_output_and_the_base_comes_back(
    engine: LlamaCppEngine, bundled: Bundled
) -> None:
    base = _text(asyncio.run(_collect(engine, LONG, max_tokens=12)))
    asyncio.run(engine.add_adapter("a", bundled.lora_a))
    try:
        with_a = _text(asyncio.run(_collect(engine, LONG, adapter="a", max_tokens=12)))
        assert with_a != base
        # Switching back drops the cache computed with the adapter.
        assert _text(asyncio.run(_collect(engine, LONG, max_tokens=12))) == base
        assert _text(asyncio.run(_collect(engine, LONG, adapter="a", max_tokens=12))) == with_a
        with pytest.raises(AdapterRejectedError, match="taken"):
            asyncio.run(engine.add_adapter("a", bundled.lora_a))
    finally:
        asyncio.run(engine.remove_adapter("a"))
    assert [a.name for a in engine.adapters()] == []


def test_an_adapter_over_the_rank_limit_is_refused(
    engine: LlamaCppEngine, bundled: Bundled
) -> None:
    with pytest.raises(AdapterRejectedError, match="rank 32"):
        asyncio.run(engine.add_adapter("big", bundled.lora_big))
    assert "big" not in [a.name for a in engine.adapters()]


def test_removing_an_adapter_spares_the_request_running_with_it(
    engine: LlamaCppEngine, bundled: Bundled
) -> None:
    asyncio.run(engine.add_adapter("r1", bundled.lora_a))
    expected = _text(asyncio.run(_collect(engine, LONG, adapter="r1", max_tokens=24)))

    async def scenario() -> str:
        got: list[ChoiceDelta] = []
        removed = False
        async for deltas in engine.generate(
            request_id="r",
            prompt_token_ids=engine.tokenize(LONG),
            params=GenerationParams(max_tokens=24, temperature=0.0),
            adapter="r1",
        ):
            got.extend(deltas)
            if not removed:
                await engine.remove_adapter("r1")
                removed = True
        return _text(got)

    assert asyncio.run(scenario()) == expected
    with pytest.raises(UnknownAdapterError):
        asyncio.run(_collect(engine, LONG, adapter="r1"))


def test_a_cancelled_stream_stops_and_the_next_request_is_unaffected(
    engine: LlamaCppEngine,
) -> None:
    expected = _text(asyncio.run(_collect(engine, PROMPT, stop=["\n"], max_tokens=32)))

    async def cancel_early() -> int:
        seen = 0
        stream = engine.generate(
            request_id="c",
            prompt_token_ids=engine.tokenize(LONG),
            params=GenerationParams(max_tokens=400, temperature=0.0),
            adapter=None,
        )
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return seen

    assert asyncio.run(cancel_early()) == 2
    # The worker runs one job at a time, so this runs once the cancelled one has stopped: had it
    # gone on to its 400 tokens, the context would hold them.
    evaluated = asyncio.run(engine._on_worker(lambda: engine._llama.n_tokens))
    assert evaluated < len(engine.tokenize(LONG)) + 50, evaluated
    assert _text(asyncio.run(_collect(engine, PROMPT, stop=["\n"], max_tokens=32))) == expected


FILE = (
    "<|fim_prefix|>import math\n\n\ndef area(radius: float) -> float:\n"
    '    """The area of a circle of the given radius."""\n    return math.pi * radius ** 2\n\n\n'
    "def circumference(radius: float) -> float:\n"
    '    """The circumference of a circle of the given radius."""\n'
)


def _fim(prefix_tail: str) -> str:
    return f"{FILE}    {prefix_tail}<|fim_suffix|>\n<|fim_middle|>"


def test_a_file_typed_into_again_after_another_reuses_its_saved_cache(
    engine: LlamaCppEngine,
) -> None:
    other = (
        "<|fim_prefix|>" + "class Stack:\n    def __init__(self):\n        self.items = []\n" * 3
    )
    # The reference: the file evaluated whole, then typed further on top of that cache. (The
    # saved caches are emptied before each half, so the second cannot find the first's.)
    engine._states = PrefixStates(PREFIX_STATES)
    asyncio.run(_collect(engine, other + "<|fim_suffix|><|fim_middle|>"))  # no shared prefix
    asyncio.run(_collect(engine, _fim("")))
    reference = _text(asyncio.run(_collect(engine, _fim("ret"), max_tokens=12)))
    assert "math.pi" in reference or "2" in reference, reference

    # The same, with another developer's request in between: their file now fills the context,
    # and the first file's cache comes back from the saved states.
    engine._states = PrefixStates(PREFIX_STATES)
    asyncio.run(_collect(engine, other + "<|fim_suffix|><|fim_middle|>"))
    asyncio.run(_collect(engine, _fim("")))
    asyncio.run(_collect(engine, other + "    def push(self, item):<|fim_suffix|><|fim_middle|>"))
    before = engine.prefix_cache_uses["saved"]
    again = _text(asyncio.run(_collect(engine, _fim("ret"), max_tokens=12)))
    assert engine.prefix_cache_uses["saved"] == before + 1
    assert again == reference
