"""Kaizen's settings: the one place that reads the environment (``KAIZEN_*``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".kaizen"


class Settings(BaseSettings):
    """Server settings. Every field can be set as ``KAIZEN_<FIELD>`` or in ``.env``."""

    model_config = SettingsConfigDict(
        env_prefix="KAIZEN_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    # --- where things live
    home: Path = Field(DEFAULT_HOME, description="Data directory (database, model cache).")
    database_url: str = Field(
        "", description="SQLAlchemy URL; default: SQLite at $KAIZEN_HOME/kaizen.db."
    )
    model_cache: Path | None = Field(
        None, description="Where the bundled model is prepared; default $KAIZEN_HOME/models."
    )

    # --- the model
    model: str = Field(
        "bundled",
        description="'bundled' (Qwen2.5-Coder-0.5B-Instruct, prepared on first use) "
        "or the path of a local Hugging Face model directory.",
    )
    served_model_name: str = Field(
        "", description="Name clients use in `model`; default: the model's directory name."
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description='LoRA adapters loaded at start, as JSON: {"name": "/path/to/adapter"}.',
    )

    # --- the engine (vLLM)
    max_model_len: int = Field(2048, ge=64, description="Context length in tokens.")
    max_loras: int = Field(2, ge=1, description="Adapters resident in one batch.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the engine accepts.")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters cached in CPU memory.")
    seed: int = Field(0, description="Engine seed (sampling without a request seed).")
    dtype: str = Field("bfloat16", description="Model dtype (bfloat16 on CPU).")
    kv_cache_gib: float = Field(2.0, gt=0, description="KV-cache size in GiB (CPU only).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = Field(False, description="Skip graph compilation (faster start).")

    # --- the API
    host: str = "127.0.0.1"
    port: int = 8000
    default_max_tokens: int = Field(
        64, ge=1, description="max_tokens when a completion request gives none."
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a client may ask.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    auth_cache_seconds: float = Field(
        10.0, ge=0, description="How long a token check is cached (revocation delay)."
    )
    log_level: str = "info"

    # --- rollout (registry -> engine; canary; rollback)
    rollout_poll_seconds: float = Field(
        2.0, gt=0, description="How often a replica reads the registry and loads what changed."
    )
    rollout_min_samples: int = Field(
        50,
        ge=1,
        description="Per side, before a canary is judged: shown completions for the "
        "acceptance rate, CI verdicts for the pass rate.",
    )
    rollout_tolerance: float = Field(
        0.02, ge=0, description="How far below the active version a canary's rates may be."
    )
    rollout_unload_grace_seconds: float = Field(
        30.0, ge=0, description="How long a version that left the routing stays loaded."
    )

    # --- the trainer (a round: records -> pairs -> selection -> DPO+NLL -> candidate adapter)
    rounds_dir: Path | None = Field(
        None, description="Where rounds keep their work and adapters; default $KAIZEN_HOME/rounds."
    )
    train_min_new_records: int = Field(
        200, ge=1, description="Start a round once this many new CI verdicts have arrived."
    )
    train_interval_hours: float = Field(
        24.0, gt=0, description="Also start one this long after the last, if anything is new."
    )
    train_poll_seconds: float = Field(
        60.0, gt=0, description="How often the trainer's worker checks whether a round is due."
    )
    train_resample: int = Field(
        8, ge=0, description="Candidates sampled per tested context that lacks a side (0: off)."
    )
    train_max_steps: int = Field(
        -1, ge=-1, description="Cap on optimiser steps per round; -1 trains full epochs."
    )
    train_auto_gate: bool = Field(
        True,
        description="After a round, run the gate on its candidate and, if approved and "
        "automatic rollout is on, make it the canary.",
    )

    # --- the evaluation gate
    mbpp_path: Path | None = Field(
        None, description="MBPP+ jsonl for the gate's mbpp_dev suite; unset: that suite is skipped."
    )
    gate_limit: int = Field(0, ge=0, description="Tasks per gate suite (0: all); for CPU hosts.")
    gate_margin_points: float = Field(
        1.0, ge=0, description="Pooled pass@1 gain (points) a candidate needs over the active one."
    )

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'kaizen.db'}"
        if self.model_cache is None:
            self.model_cache = self.home / "models"
        if self.rounds_dir is None:
            self.rounds_dir = self.home / "rounds"
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                "KAIZEN_DEFAULT_MAX_TOKENS must not exceed KAIZEN_MAX_TOKENS_LIMIT "
                f"({self.default_max_tokens} > {self.max_tokens_limit})"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
