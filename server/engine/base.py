"""What the service layer needs from an inference engine, independent of vLLM's types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class EngineError(RuntimeError):
    """The engine failed a request (not the client's fault)."""


class EngineNotReadyError(EngineError):
    """The engine is still starting, or failed to start."""


class UnknownAdapterError(LookupError):
    """A request named an adapter the engine does not have loaded."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters, already validated and defaulted by the service."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None


@dataclass
class ChoiceDelta:
    """New output of one choice since the last delta."""

    index: int
    text: str
    token_count: int
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None = None  # the stop string or token that ended it


@dataclass
class AdapterInfo:
    name: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """An engine serving one base model plus named LoRA adapters."""

    model_name: str
    max_model_len: int

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    def is_ready(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The model's chat prompt for ``messages``, ending where the assistant speaks."""

    def special_token_id(self, token: str) -> int | None:
        """The id of a special token such as ``<|fim_middle|>``, or None if absent."""

    def adapters(self) -> list[AdapterInfo]: ...

    async def add_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter under a new ``name``; raises
        :class:`server.engine.lora.AdapterRejectedError` for one it cannot serve."""

    async def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests already running with it are not affected."""

    def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        adapter: str | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Stream deltas; cancelling the consumer aborts the request in the engine."""

    async def shutdown(self) -> None: ...
