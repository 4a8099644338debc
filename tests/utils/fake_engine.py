"""A scripted engine for unit tests of the HTTP and service layers (no model, no vLLM).

It tokenises one character per token, answers with ``reply(prompt_text, adapter, index)``
character by character, and honours stop strings, stop tokens and max_tokens the way vLLM does
(the stop string is cut off and ends the choice with ``finish_reason="stop"``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from server.engine.base import AdapterInfo, ChoiceDelta, GenerationParams, UnknownAdapterError
from server.engine.lora import AdapterRejectedError, check_adapter

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|file_sep|>",
    "<|repo_name|>",
]

# Special tokens' ids start above the last Unicode code point, so that no character's id (its
# code point) is taken for one: prompts may hold any text.
SPECIAL_BASE = 0x110000


def default_reply(prompt: str, adapter: str | None, index: int) -> str:
    return f"x = {index}  # {adapter or 'base'}\nreturn x\n"


class FakeEngine:
    def __init__(
        self,
        *,
        reply: Callable[[str, str | None, int], str] = default_reply,
        model_name: str = "fake-model",
        max_model_len: int = 256,
        max_lora_rank: int = 16,
        base_sha256: str | None = None,
        token_delay: float = 0.0,
        adapters: dict[str, str] | None = None,
        fail_after: int | None = None,
        ready: bool = True,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.reply = reply
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.max_lora_rank = max_lora_rank
        self.base_sha256 = base_sha256
        self.removed: list[str] = []
        self._adapters = dict(adapters or {"test-adapter": "/adapters/test"})
        self._ready = ready
        self.started = False
        self.aborted: list[str] = []
        self.requests: list[tuple[str, str | None, GenerationParams]] = []
        # Lengths of the texts tokenised, to see that a prompt was refused before tokenising.
        self.tokenized: list[int] = []
        # Tests that need a request to stay in tokenize() or in generate() set these: the fake
        # blocks (tokenize: its thread; generate: cooperatively) until the event is set, and
        # signals with tokenizing/generating that a request got there.
        self.hold_tokenize: threading.Event | None = None
        self.hold_generate: threading.Event | None = None
        self.tokenizing = threading.Event()
        self.generating = threading.Event()

    async def start(self) -> None:
        self.started = True

    def is_ready(self) -> bool:
        return self._ready

    def tokenize(self, text: str) -> list[int]:
        self.tokenized.append(len(text))
        if self.hold_tokenize is not None:
            self.tokenizing.set()
            self.hold_tokenize.wait(timeout=30)
        ids: list[int] = []
        i = 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if special:
                ids.append(SPECIAL_BASE + SPECIALS.index(special))
                i += len(special)
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return "".join(SPECIALS[i - SPECIAL_BASE] if i >= SPECIAL_BASE else chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    def special_token_id(self, token: str) -> int | None:
        return SPECIAL_BASE + SPECIALS.index(token) if token in SPECIALS else None

    def adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo(name=n, path=p) for n, p in self._adapters.items()]

    async def add_adapter(self, name: str, path: str) -> AdapterInfo:
        """Checks the adapter like the real engine (directory, rank, weights, base) and
        "loads" it; the fake's replies then carry its name."""
        if name in self._adapters or name == self.model_name:
            raise AdapterRejectedError(f"The name {name!r} is taken.")
        check_adapter(Path(path), max_rank=self.max_lora_rank, base_sha256=self.base_sha256)
        self._adapters[name] = str(path)
        return AdapterInfo(name=name, path=str(path))

    async def remove_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        self.removed.append(name)

    async def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        adapter: str | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        if adapter is not None and adapter not in self._adapters:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded")
        prompt = self.detokenize(prompt_token_ids)
        self.requests.append((prompt, adapter, params))
        self.generating.set()
        if self.hold_generate is not None:
            # Bounded like hold_tokenize, so that a test whose release never comes fails.
            for _ in range(6000):
                if self.hold_generate.is_set():
                    break
                await asyncio.sleep(0.005)
        texts = [self._finish(self.reply(prompt, adapter, i), params) for i in range(params.n)]
        produced = 0
        try:
            for step in range(max(len(t[0]) for t in texts) + 1):
                deltas = []
                for index, (text, reason, stop_reason) in enumerate(texts):
                    if step < len(text):
                        last = step == len(text) - 1
                        deltas.append(
                            ChoiceDelta(
                                index=index,
                                text=text[step],
                                token_count=1,
                                finish_reason=reason if last else None,
                                stop_reason=stop_reason if last else None,
                            )
                        )
                    elif step == len(text) == 0:
                        deltas.append(
                            ChoiceDelta(
                                index=index,
                                text="",
                                token_count=0,
                                finish_reason=reason,
                                stop_reason=stop_reason,
                            )
                        )
                if not deltas:
                    break
                if self.fail_after is not None and produced >= self.fail_after:
                    raise RuntimeError("engine failed (scripted)")
                produced += 1
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                yield deltas
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    @staticmethod
    def _finish(text: str, params: GenerationParams) -> tuple[str, str, str | None]:
        """Apply stops like vLLM: earliest stop string wins and is cut; else max_tokens."""
        cut, hit = len(text), None
        for stop in params.stop:
            at = text.find(stop)
            if at != -1 and at < cut:
                cut, hit = at, stop
        if cut > params.max_tokens:
            return text[: params.max_tokens], "length", None
        return text[:cut], "stop", hit

    async def shutdown(self) -> None:
        self.started = False
