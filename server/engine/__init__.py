"""The inference engine behind the API: the :class:`Engine` interface, implemented with vLLM."""

from server.engine.base import (
    ChoiceDelta,
    Engine,
    EngineError,
    EngineNotReadyError,
    GenerationParams,
    UnknownAdapterError,
)

__all__ = [
    "ChoiceDelta",
    "Engine",
    "EngineError",
    "EngineNotReadyError",
    "GenerationParams",
    "UnknownAdapterError",
]
