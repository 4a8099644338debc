"""Kaizen's settings: the one place that reads the environment (``KAIZEN_*``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

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

    # --- the engine: vLLM (GPU hosts) or llama.cpp (the CPU default)
    engine: Literal["auto", "vllm", "llama_cpp"] = Field(
        "auto",
        description="Which engine serves: 'vllm', 'llama_cpp' (llama.cpp on the model's GGUF, "
        "for CPU hosts), or 'auto': llama.cpp on a host without a GPU when the model has a "
        "GGUF (the bundled model does, or KAIZEN_GGUF) and llama-cpp-python is installed, "
        "vLLM otherwise.",
    )
    gguf: Path | None = Field(
        None,
        description="The GGUF file of KAIZEN_MODEL for the llama.cpp engine (the bundled model "
        "brings its own). Its weights must be the checkpoint's (quantised is fine): adapters "
        "are trained on the checkpoint and applied to this file.",
    )
    max_model_len: int = Field(2048, ge=64, description="Context length in tokens.")
    max_loras: int = Field(2, ge=1, description="Adapters resident in one batch.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the engine accepts.")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters cached in CPU memory.")
    seed: int = Field(0, description="Engine seed (sampling without a request seed).")
    dtype: str = Field("bfloat16", description="Model dtype (bfloat16 on CPU).")
    kv_cache_gib: float = Field(2.0, gt=0, description="KV-cache size in GiB (CPU only).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of each GPU's memory vLLM may take (GPU hosts)."
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs one replica's engine splits the model over (vLLM tensor parallelism; "
        "GPU hosts only, 1 on the CPU).",
    )
    enforce_eager: bool = Field(False, description="Skip graph compilation (faster start).")
    engine_metrics: bool = Field(
        True,
        description="Collect vLLM's own Prometheus metrics (vllm:*, shown by GET /metrics "
        "beside Kaizen's); false turns vLLM's statistics off entirely.",
    )

    # --- the API
    host: str = "127.0.0.1"
    port: int = 8000
    default_max_tokens: int = Field(
        64, ge=1, description="max_tokens when a completion request gives none."
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a client may ask.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    clamp_max_tokens: bool = Field(
        False,
        description="Lower a max_tokens that does not fit to what fits instead of refusing it "
        "(per request: `clamp_max_tokens: true`). For clients with a fixed large max_tokens "
        "(Continue sends 4096).",
    )

    # --- editor clients that speak their own protocol (server/api/routes/tabby.py, continue_sink)
    tabby_max_tokens: int = Field(
        64, ge=1, description="max_tokens of a Tabby completion (Tabby's own default is 64)."
    )
    tabby_temperature: float = Field(
        0.1,
        ge=0,
        le=2,
        description="Temperature of a Tabby completion that sends none (Tabby's default: 0.1).",
    )
    continue_match_window_seconds: float = Field(
        3600.0,
        gt=0,
        description="How far back a Continue data event looks for the completion it is about.",
    )
    continue_repository_host: str = Field(
        "github.com",
        description="Host put before Continue's `gitRepo` (it sends only owner/name) to make "
        "the repository id CI uses (github.com/owner/name).",
    )
    auth_cache_seconds: float = Field(
        10.0, ge=0, description="How long a token check is cached (revocation delay)."
    )
    auth_outage_grace_seconds: float = Field(
        900.0,
        ge=0,
        description="While the database is unreachable, a token verified within this many "
        "seconds keeps working; others get 503 with Retry-After.",
    )
    auth_outage_cache_size: int = Field(
        10_000, ge=1, description="Most tokens remembered for the outage grace."
    )

    # --- records: the local journal (no acknowledged record is lost)
    journal_dir: Path | None = Field(
        None,
        description="Where acknowledged records wait for the database (fsynced segments, "
        "mode 0600); default $KAIZEN_HOME/journal. Replayed at start.",
    )
    recorder_drain_seconds: float = Field(
        10.0,
        ge=0,
        description="On shutdown, how long to wait for the database to take queued records "
        "before leaving them in the journal for the next start.",
    )

    # --- CPU cores for vLLM on the CPU (VLLM_CPU_OMP_THREADS_BIND, if set, wins)
    cpu_cores: str = Field(
        "auto",
        description="Cores the server's engine binds its threads to, e.g. '0-7' or '0,2,4'; "
        "'auto': every core this process may use, or the lower half with "
        "KAIZEN_CPU_SHARED_WITH_TRAINER.",
    )
    trainer_cpu_cores: str = Field(
        "auto",
        description="Cores the trainer's generator binds to; 'auto': every core, or the "
        "upper half with KAIZEN_CPU_SHARED_WITH_TRAINER.",
    )
    cpu_shared_with_trainer: bool = Field(
        False,
        description="The server and the trainer's generator run on this host: 'auto' cores "
        "are split between them instead of both taking all.",
    )
    log_level: str = "info"

    # --- limits (per replica: each server process keeps its own counters)
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body; a larger one is refused with 413."
    )
    prompt_chars_per_token: float = Field(
        16.0,
        gt=0,
        description="Prompts longer than the context length times this many characters are "
        "refused before tokenising (code averages 3-4 characters per token).",
    )
    rate_limit_per_minute: float = Field(
        3000.0, ge=0, description="Requests per minute per token, sustained (0: no limit)."
    )
    rate_limit_burst: int = Field(
        500, ge=1, description="Requests a token may send at once before the rate applies."
    )
    max_concurrent_per_token: int = Field(
        64, ge=0, description="Requests in flight per token, streams included (0: no limit)."
    )
    public_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json without a token."
    )

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
    canary_regression_points: float = Field(
        5.0,
        gt=0,
        lt=100,
        description="The canary's sequential test: the loss (points of acceptance or CI pass "
        "rate) it must catch.",
    )
    canary_alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Chance of promoting a canary that much worse."
    )
    canary_beta: float = Field(
        0.2, gt=0, lt=0.5, description="Chance, per metric, of rolling back an equal canary."
    )
    canary_min_hours: float = Field(1.0, ge=0, description="No canary decision before this.")
    canary_max_hours: float = Field(
        72.0, gt=0, description="A canary is decided by this (fixed-sample bound if undecided)."
    )
    canary_max_samples: int = Field(
        5000, ge=1, description="...or once the canary has shown this many completions."
    )
    rollout_unload_grace_seconds: float = Field(
        30.0, ge=0, description="How long a version that left the routing stays loaded."
    )

    # --- the trainer (a round: records -> pairs -> selection -> DPO+NLL -> candidate adapter)
    rounds_dir: Path | None = Field(
        None, description="Where rounds keep their work and adapters; default $KAIZEN_HOME/rounds."
    )

    # --- where adapters are published and fetched (server/store/artifacts.py)
    adapter_store: str = Field(
        "",
        description="Where the trainer publishes adapters and replicas fetch them: "
        "file:///dir (a mount all hosts share) or s3://bucket/prefix (any S3-compatible store; "
        "credentials from the usual AWS_* variables). Empty: adapters stay where the trainer "
        "wrote them, recorded as file:// URLs (one host).",
    )
    adapter_store_endpoint_url: str = Field(
        "", description="The S3 endpoint of a store that is not AWS (MinIO, Ceph, ...)."
    )
    adapter_cache_dir: Path | None = Field(
        None,
        description="A replica's copies of adapters fetched from the store; "
        "default $KAIZEN_HOME/adapter-cache.",
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
    train_num_processes: int = Field(
        1,
        ge=1,
        description="Processes a round's training runs in (trainer.launch): 1 trains in the "
        "trainer's own process (the CPU path); N > 1 runs `accelerate launch` with N processes, "
        "one per GPU, data-parallel (DDP).",
    )
    train_auto_gate: bool = Field(
        True,
        description="After a round, run the gate on its candidate and, if approved and "
        "automatic rollout is on, make it the canary.",
    )
    train_max_token_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of a round's pairs one CI token's reports may be behind "
        "(1: no cap).",
    )
    train_max_fix_distance: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Largest normalised edit distance of a fix from the served text.",
    )
    retention_days: float = Field(
        0,
        ge=0,
        description="Delete completions, their feedback and CI runs older than this many days "
        "(the trainer's worker prunes); 0 keeps them forever.",
    )

    # --- the evaluation gate
    mbpp_path: Path | None = Field(
        None,
        description="MBPP+ jsonl (plain or gzipped) for the gate's mbpp_dev suite; unset: the "
        "copy bundled with Kaizen.",
    )
    gate_limit: int = Field(0, ge=0, description="Tasks per gate suite (0: all); for CPU hosts.")
    gate_margin_points: float = Field(
        0.0, ge=0, description="The pooled gain's lower bound must exceed this (points)."
    )
    gate_samples: int = Field(
        16, ge=1, description="Completions per task and side (16: 80% power at +5 points)."
    )
    gate_temperature: float = Field(
        0.8, ge=0, description="Sampling temperature of the gate's completions."
    )
    gate_family_alpha: float = Field(
        0.04,
        gt=0,
        lt=1,
        description="Chance of any false approval over KAIZEN_GATE_ROUNDS consecutive gatings.",
    )
    gate_rounds: int = Field(
        10, ge=1, description="Gatings the family alpha covers (each tests at alpha/rounds)."
    )
    gate_ni_points: float = Field(
        5.0, ge=0, description="No suite's (recorded included) lower bound below -this (points)."
    )

    # --- the judge (trainer/judge.py): yes/no answers where no test ran, and judge pairs
    judge_model: str = Field(
        "",
        description="The judge's model: '' (no judge, no judge pairs), 'bundled', or a local "
        "Hugging Face model directory (on a GPU host a larger coder judges better).",
    )
    judge_min_agreement: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Judge pairs only when the judge agreed with at least this share of the "
        "round's sealed verdicts it was measured on.",
    )
    judge_min_judged: int = Field(
        32, ge=1, description="Sealed verdicts the agreement must be measured on, at least."
    )
    judge_calibration_items: int = Field(
        64, ge=1, description="Sealed completions per round the judge is measured on (cost)."
    )
    judge_max_pairs: int = Field(64, ge=0, description="Judge pairs per round, at most (0: none).")
    judge_pair_weight: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="A judge pair's weight in the DPO loss; an execution pair weighs 1.",
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
        if self.adapter_cache_dir is None:
            self.adapter_cache_dir = self.home / "adapter-cache"
        if self.journal_dir is None:
            self.journal_dir = self.home / "journal"
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


# KAIZEN_* variables that are not server settings: the CI and editor clients' own
# (plugins/PROTOCOL.md), what the engine passes its children, the benchmarks' tokens and the
# tests' database and model cache.
CLIENT_VARIABLES = frozenset(
    {
        "KAIZEN_URL",
        "KAIZEN_TOKEN",
        "KAIZEN_RUN_ID",
        "KAIZEN_SPOOL_DIR",
        "KAIZEN_MAX_N",
        "KAIZEN_EXPLORE",
        "KAIZEN_EXPLORE_K",
        "KAIZEN_EXPLORE_BUDGET",
        "KAIZEN_EXPLORE_RESULTS",
        "KAIZEN_PYTEST_ACTIVE",
        "KAIZEN_IDE_TOKEN",
        "KAIZEN_CI_TOKEN",
        "KAIZEN_OPS_TOKEN",
        "KAIZEN_INHERITED_CPU_BIND",
        "KAIZEN_TEST_POSTGRES_URL",
        "KAIZEN_TEST_MODEL_CACHE",
    }
)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``KAIZEN_*`` variable that is no setting (a typo, or one a newer or
    older version had), with the closest real name: such a variable is silently ignored
    otherwise, and the server runs on the default it was meant to change."""
    prefix = "KAIZEN_"
    known = {prefix + name.upper() for name in Settings.model_fields}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(prefix) or name in known or name in CLIENT_VARIABLES:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a Kaizen setting and is ignored{hint}")
    return warnings
