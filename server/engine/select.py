"""Which engine serves: vLLM on GPU hosts, llama.cpp on CPU hosts (``KAIZEN_ENGINE``)."""

from __future__ import annotations

import logging
from typing import Literal

from server.config import Settings
from server.engine.base import Engine, EngineError

log = logging.getLogger(__name__)

EngineKind = Literal["vllm", "llama_cpp"]


def has_gpu() -> bool:
    """Whether torch sees a CUDA (or ROCm) device: the host vLLM is built for."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def engine_kind(settings: Settings) -> EngineKind:
    """``KAIZEN_ENGINE`` if set; with ``auto``, llama.cpp where it is the faster engine (no GPU,
    llama-cpp-python installed, a GGUF of the model at hand), vLLM everywhere else."""
    from server.engine.llama_engine import llama_cpp_available

    if settings.engine == "llama_cpp":
        if not llama_cpp_available():
            raise EngineError(
                "KAIZEN_ENGINE=llama_cpp but llama-cpp-python is not installed: install "
                "Kaizen with the 'cpu' extra, or set KAIZEN_ENGINE=vllm."
            )
        return "llama_cpp"
    if settings.engine == "vllm":
        return "vllm"
    has_gguf = settings.model == "bundled" or settings.gguf is not None
    if has_gguf and llama_cpp_available() and not has_gpu():
        return "llama_cpp"
    return "vllm"


def build_engine(settings: Settings) -> Engine:
    """The engine ``engine_kind`` chooses, not yet started."""
    kind = engine_kind(settings)
    log.info("event=engine_chosen engine=%s setting=%s", kind, settings.engine)
    if kind == "llama_cpp":
        from server.engine.llama_engine import LlamaCppEngine

        return LlamaCppEngine.from_settings(settings)
    from server.engine.vllm_engine import VllmEngine

    return VllmEngine.from_settings(settings)
