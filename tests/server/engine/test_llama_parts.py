"""The llama.cpp engine's pure parts: stop strings over a token stream, the PEFT -> GGUF LoRA
names and refusals, end-of-sequence ids, and which engine ``auto`` picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.config import Settings
from server.engine import select
from server.engine.base import EngineError
from server.engine.gguf_lora import effective_alpha, gguf_tensor_name
from server.engine.llama_engine import StopStringStream, eos_token_ids
from server.engine.lora import AdapterRejectedError

# A toy vocabulary: each token id is one piece of text; 9 is half of a two-byte character.
PIECES = {1: "a", 2: "b", 3: "\n", 4: "cd", 5: "e\n", 6: "x"}


def _decode(ids: list[int]) -> str:
    out = ""
    for i, token in enumerate(ids):
        if token == 9:
            # the first byte of "é": complete only once token 10 follows
            out += "é" if i + 1 < len(ids) and ids[i + 1] == 10 else "\ufffd"
        elif token != 10:
            out += PIECES[token]
    return out


def _run(tokens: list[int], stops: list[str]) -> tuple[list[str], str | None, str]:
    stream = StopStringStream(_decode, stops)
    deltas, hit = [], None
    for token in tokens:
        delta, hit = stream.push(token)
        deltas.append(delta)
        if hit is not None:
            break
    rest = "" if hit is not None else stream.flush()
    return deltas, hit, "".join(deltas) + rest


def test_a_stop_string_is_cut_and_never_released() -> None:
    deltas, hit, text = _run([1, 2, 3, 1], ["\n"])
    assert hit == "\n" and text == "ab" and deltas == ["a", "b", ""]


def test_text_that_may_begin_a_stop_is_held_back_until_it_does_not() -> None:
    # "cd" could be the start of "cde": nothing is released until "x" rules it out.
    deltas, hit, text = _run([4, 6, 1], ["cde"])
    assert hit is None and deltas[0] == "" and text == "cdxa"
    deltas, hit, text = _run([1, 4, 5], ["cde"])
    assert hit == "cde" and text == "a"


def test_the_earliest_stop_wins_and_stops_spanning_tokens_are_found() -> None:
    _, hit, text = _run([1, 4, 5], ["e\n", "dc", "d"])
    assert hit == "d" and text == "ac"
    _, hit, text = _run([2, 4, 5], ["de"])  # "d" ends token 4, "e" begins token 5
    assert hit == "de" and text == "bc"


def test_an_incomplete_character_is_held_back() -> None:
    stream = StopStringStream(_decode, [])
    assert stream.push(1) == ("a", None)
    assert stream.push(9) == ("", None)  # half a character: nothing yet
    assert stream.push(10) == ("é", None)
    assert stream.flush() == ""


def test_no_stop_strings_release_every_token_at_once() -> None:
    deltas, hit, text = _run([1, 2, 3], [])
    assert deltas == ["a", "b", "\n"] and hit is None and text == "ab\n"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "blk.0.attn_q.weight.lora_a",
        ),
        (
            "base_model.model.model.layers.23.mlp.down_proj.lora_B.weight",
            "blk.23.ffn_down.weight.lora_b",
        ),
        (
            "base_model.model.model.layers.4.self_attn.o_proj.lora_B.default.weight",
            "blk.4.attn_output.weight.lora_b",
        ),
    ],
)
def test_peft_names_map_onto_llama_cpp_tensor_names(key: str, name: str) -> None:
    assert gguf_tensor_name(key) == name


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
    ],
)
def test_modules_llama_cpp_cannot_adapt_are_refused(key: str) -> None:
    with pytest.raises(AdapterRejectedError, match="KAIZEN_ENGINE=vllm"):
        gguf_tensor_name(key)


def test_alpha_carries_peft_scaling() -> None:
    assert effective_alpha({"r": 8, "lora_alpha": 16}) == 16
    assert effective_alpha({"r": 16, "lora_alpha": 16, "use_rslora": True}) == 64


def test_eos_ids_come_from_the_generation_config_first(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(tmp_path) == {7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert eos_token_ids(tmp_path) == {5, 6}


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_auto_serves_with_llama_cpp_on_a_cpu_host_with_a_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(select, "has_gpu", lambda: False)
    assert select.engine_kind(_settings(model="bundled")) == "llama_cpp"
    # A local checkpoint without a GGUF: vLLM, unless KAIZEN_GGUF names one.
    assert select.engine_kind(_settings(model=str(tmp_path))) == "vllm"
    gguf = tmp_path / "m.gguf"
    assert select.engine_kind(_settings(model=str(tmp_path), gguf=gguf)) == "llama_cpp"
    assert select.engine_kind(_settings(model="bundled", engine="vllm")) == "vllm"
    monkeypatch.setattr(select, "has_gpu", lambda: True)
    assert select.engine_kind(_settings(model="bundled")) == "vllm"
    assert select.engine_kind(_settings(model="bundled", engine="llama_cpp")) == "llama_cpp"


def test_llama_cpp_asked_for_but_not_installed_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.engine.llama_engine as llama_engine

    monkeypatch.setattr(llama_engine, "llama_cpp_available", lambda: False)
    with pytest.raises(EngineError, match="'cpu' extra"):
        select.engine_kind(_settings(engine="llama_cpp"))
    monkeypatch.setattr(select, "has_gpu", lambda: False)
    assert select.engine_kind(_settings(model="bundled")) == "vllm"


def test_a_cache_is_reused_only_for_a_long_prefix_short_of_the_whole_prompt() -> None:
    from server.engine.llama_engine import MIN_PREFIX_REUSE, reusable_prefix

    long = list(range(100))
    assert reusable_prefix(long[:80], long)  # the same file, typed further
    assert reusable_prefix(long + [7], long[:60] + [9])  # shared up to the cursor
    assert not reusable_prefix(long, long)  # the whole prompt again: evaluated whole
    assert not reusable_prefix(long[: MIN_PREFIX_REUSE - 1], long)  # too short to pay
    assert not reusable_prefix([], long)


def test_saved_prefix_states_pick_the_longest_shared_prefix_of_the_same_adapter() -> None:
    from server.engine.llama_engine import PrefixStates, _Saved

    states = PrefixStates(capacity=2)
    a, b = object(), object()
    states.add(_Saved(adapter=None, tokens=[1, 2, 3], data=None, size=0))
    states.add(_Saved(adapter=a, tokens=[1, 2, 3, 4, 5], data=None, size=0))
    saved, shared = states.best(None, [1, 2, 3, 4, 9])
    assert saved is not None and saved.tokens == [1, 2, 3] and shared == 3
    assert states.best(a, [1, 2, 3, 4, 9])[1] == 4
    assert states.best(b, [1, 2, 3])[0] is None
    # A cache that extends an older one of the same file replaces it; the oldest goes first.
    states.add(_Saved(adapter=None, tokens=[1, 2, 3, 7], data=None, size=0))
    assert len(states) == 2
    states.add(_Saved(adapter=None, tokens=[8, 9], data=None, size=0))
    assert len(states) == 2 and states.best(a, [1, 2, 3, 4])[0] is None
    states.drop(a)
    assert states.best(None, [1, 2, 3, 7, 1])[1] == 4
