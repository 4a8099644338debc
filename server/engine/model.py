"""Which model an engine serves: the checkpoint directory, its GGUF file, the name clients use.

No engine library is imported here, so commands that only need the paths (``kaizen model``,
the trainer) stay light.
"""

from __future__ import annotations

from pathlib import Path

from server.config import Settings
from server.engine.base import EngineError


def resolve_model_dir(settings: Settings) -> Path:
    """The checkpoint directory to serve: the bundled model (prepared on first use) or a path."""
    if settings.model == "bundled":
        from server.model_prep import prepare_bundled_model

        assert settings.model_cache is not None
        return prepare_bundled_model(settings.model_cache)
    path = Path(settings.model).expanduser()
    if not (path / "config.json").is_file():
        raise EngineError(
            f"KAIZEN_MODEL={settings.model} is not a Hugging Face model directory "
            "(no config.json). Use 'bundled' or a local checkpoint directory."
        )
    return path


def resolve_gguf(settings: Settings) -> Path | None:
    """The GGUF file of the served model for the llama.cpp engine, or None if there is none.

    ``KAIZEN_GGUF`` wins; the bundled model keeps the GGUF its checkpoint was converted from
    (fetched again if an older cache lacks it). A local Hugging Face directory has none unless
    ``KAIZEN_GGUF`` names one."""
    if settings.gguf is not None:
        path = Path(settings.gguf).expanduser()
        if not path.is_file():
            raise EngineError(f"KAIZEN_GGUF={settings.gguf} is not a file.")
        return path
    if settings.model == "bundled":
        from server.model_prep import ensure_bundled_gguf

        assert settings.model_cache is not None
        return ensure_bundled_gguf(settings.model_cache)
    return None


def served_name(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == "bundled":
        from server.model_prep import BUNDLED_MODEL_NAME

        return BUNDLED_MODEL_NAME
    return Path(settings.model).expanduser().name
