"""ORM models. API schemas live apart, in ``server/protocol/completions.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import true as sa_true
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the database keeps
    (SQLite stores no zone; PostgreSQL does)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: Kaizen stores timezone-aware timestamps only")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text: store them all in UTC without an offset.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class SafeText(TypeDecorator[str]):
    """Text that any database stores: PostgreSQL refuses NUL characters in text, and models
    (or clients) do produce them, so they are stored as U+FFFD instead of failing the row."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return value.replace("\x00", "\ufffd") if value is not None else None


class SafeString(TypeDecorator[str]):
    """``String(n)`` for text that clients choose (languages, repositories, ids): NUL stored
    as U+FFFD, as :class:`SafeText` does, so PostgreSQL never refuses the row. Lookups bind
    through the same type, so a value with a NUL still finds its row."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return value.replace("\x00", "\ufffd") if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    """A bearer token. Only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(SafeString(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # The first characters of the secret, so a person can tell tokens apart in a listing.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    # False: a ``ci`` token reports on (and reads the ledgers of) only the repositories in
    # ``repositories``. True: every repository (a single-team install; tokens made before
    # repository scoping existed).
    all_repositories: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_true())

    repositories: Mapped[list[ApiTokenRepository]] = relationship(
        back_populates="token", lazy="selectin", cascade="all, delete-orphan"
    )


class ApiTokenRepository(Base):
    """One repository a scoped token may report on, normalised like the extension's origin
    (``host/owner/name``, see ``plugins/common/kaizen_client/repository.py``)."""

    __tablename__ = "api_token_repositories"

    token_id: Mapped[int] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), primary_key=True
    )
    repository: Mapped[str] = mapped_column(SafeString(512), primary_key=True)

    token: Mapped[ApiToken] = relationship(back_populates="repositories")


class ExcludedRepository(Base):
    """A repository whose records never become training data (``kaizen repos exclude``)."""

    __tablename__ = "excluded_repositories"

    repository: Mapped[str] = mapped_column(SafeString(512), primary_key=True)
    excluded_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    excluded_by: Mapped[str] = mapped_column(SafeString(200))
    reason: Mapped[str] = mapped_column(SafeText(), default="")


class Completion(Base):
    """One request to /v1/completions or /v1/chat/completions, whatever its fate."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(16))  # "completions" | "chat"
    model: Mapped[str] = mapped_column(SafeString(200))  # what the client asked for
    adapter: Mapped[str | None] = mapped_column(String(200), index=True)  # None: base model
    prompt: Mapped[str] = mapped_column(SafeText())
    suffix: Mapped[str | None] = mapped_column(SafeText())
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    stream: Mapped[bool] = mapped_column(Boolean)
    # "completed": every choice finished; "aborted": the client went away;
    # "failed": the engine or server failed the request.
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(SafeText())
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    language: Mapped[str | None] = mapped_column(SafeString(64))
    file_path: Mapped[str | None] = mapped_column(SafeText())
    repository: Mapped[str | None] = mapped_column(SafeText())
    # "serve": asked for by a client; "resample": an alternative CI asked for to explore a
    # served completion's context (POST /v1/resample), whose served record is ``parent_id``.
    source: Mapped[str] = mapped_column(String(16), default="serve", server_default="serve")
    parent_id: Mapped[str | None] = mapped_column(String(64), index=True)

    choices: Mapped[list[RecordedChoice]] = relationship(
        back_populates="completion", order_by="RecordedChoice.index", lazy="selectin"
    )


class RecordedChoice(Base):
    """The text handed out for one choice of a completion (after post-processing)."""

    __tablename__ = "completion_choices"

    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(SafeText())
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column(Integer, default=0)

    completion: Mapped[Completion] = relationship(back_populates="choices")


class CompletionEvent(Base):
    """What the developer did with a completion, as the IDE reported it."""

    __tablename__ = "completion_events"

    id: Mapped[str] = mapped_column(SafeString(64), primary_key=True)  # client-generated
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    type: Mapped[str] = mapped_column(String(32))
    timestamp: Mapped[datetime] = mapped_column(UtcDateTime())
    accepted_length: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(SafeText())
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class LedgerEntry(Base):
    """Where an accepted completion lives in a repository, and its text there now."""

    __tablename__ = "ledger_entries"

    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True
    )
    choice_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    repository: Mapped[str] = mapped_column(SafeString(512), index=True)
    file_path: Mapped[str] = mapped_column(SafeText())
    inserted_text: Mapped[str] = mapped_column(SafeText())
    current_text: Mapped[str] = mapped_column(SafeText())
    start_offset: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # "active" | "removed"
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class CiRun(Base):
    """One CI run's report, stored as sent (``raw``) and in columns.

    A run is known by its repository and the CI's own run id: run ids are only unique within a
    repository (CI numbers runs per project), so a report for another repository never collides
    with, or pre-empts, this one."""

    __tablename__ = "ci_runs"
    __table_args__ = (
        UniqueConstraint("repository_key", "run_id", name="uq_ci_runs_repository_run"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(SafeString(256))  # the CI's id, within the repository
    repository: Mapped[str] = mapped_column(SafeString(512), index=True)  # as sent
    # ``normalise_repository(repository)``: one key however the repository was spelt.
    repository_key: Mapped[str] = mapped_column(SafeString(512))
    commit: Mapped[str] = mapped_column(SafeString(64))
    branch: Mapped[str | None] = mapped_column(SafeString(256))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    tests: Mapped[list[Any]] = mapped_column(JSON)
    log_tail: Mapped[str] = mapped_column(SafeText(), default="")
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class CompletionOutcome(Base):
    """A CI run's verdict on one completion, with the completion's text at CI time."""

    __tablename__ = "completion_outcomes"
    __table_args__ = (
        UniqueConstraint(
            "ci_run_id", "completion_id", "choice_index", name="uq_completion_outcomes_run_choice"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ci_run_id: Mapped[int] = mapped_column(ForeignKey("ci_runs.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(SafeString(256))  # the CI's id, as on the run
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    file_path: Mapped[str] = mapped_column(SafeText())
    final_text: Mapped[str] = mapped_column(SafeText())
    status: Mapped[str] = mapped_column(String(16))
    tests: Mapped[list[Any]] = mapped_column(JSON)
    # Test code that judges the completion in the trainer's sandbox, where the hook sent one.
    test_code: Mapped[str | None] = mapped_column(SafeText(), default=None)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class CompletionExecutability(Base):
    """Would one text of a completion run, where no test said (``kaizen_client.executability``):
    parses, imports resolve, API use binds, runs. ``checked_in`` says whose environment judged
    the imports: ``ci`` (the project's, by the plugin) or ``sandbox`` (the trainer's)."""

    __tablename__ = "completion_executability"
    __table_args__ = (
        UniqueConstraint(
            "completion_id",
            "choice_index",
            "text_sha256",
            "checked_in",
            name="uq_completion_executability_text",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    text_sha256: Mapped[str] = mapped_column(String(64))  # of the text checked
    checked_in: Mapped[str] = mapped_column(String(16))  # "ci" | "sandbox"
    parses: Mapped[bool] = mapped_column(Boolean)
    imports_ok: Mapped[bool | None] = mapped_column(Boolean)
    api_ok: Mapped[bool | None] = mapped_column(Boolean)
    runs: Mapped[bool | None] = mapped_column(Boolean)  # None: not run, or inconclusive
    executable: Mapped[bool] = mapped_column(Boolean)
    problems: Mapped[list[Any]] = mapped_column(JSON)
    checked_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class JudgeVerdictRow(Base):
    """A judge model's answers about one text of a completion (``trainer.judge``): per question
    yes (true), no (false) or unparsed (null), the raw reply, and which judge and questionnaire."""

    __tablename__ = "judge_verdicts"
    __table_args__ = (
        UniqueConstraint(
            "completion_id",
            "choice_index",
            "text_sha256",
            "judge_name",
            "prompt_version",
            name="uq_judge_verdicts_text_judge",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    text_sha256: Mapped[str] = mapped_column(String(64))  # of the text judged
    judge_name: Mapped[str] = mapped_column(SafeString(200))
    prompt_version: Mapped[str] = mapped_column(String(32))
    answers: Mapped[dict[str, Any]] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float)  # share of yes among parsed answers
    raw: Mapped[str] = mapped_column(SafeText())
    judged_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TrainingRound(Base):
    """One round of the trainer: its inputs, funnel, metrics, timings and result."""

    __tablename__ = "training_rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # "running" | "succeeded" (a candidate was registered) | "stopped" (non-finite values; the
    # active adapter stays) | "failed" (an error) | "skipped" (nothing to train on).
    status: Mapped[str] = mapped_column(String(16), index=True)
    trigger: Mapped[str] = mapped_column(String(16))  # "manual" | "records" | "schedule"
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    # Outcomes received up to this instant are this round's input; later ones count as new.
    records_until: Mapped[datetime] = mapped_column(UtcDateTime())
    parent_adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    work_dir: Mapped[str] = mapped_column(SafeText())
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    funnel: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    durations: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    alarms: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(SafeText(), default=None)


class Adapter(Base):
    """A LoRA adapter version in the registry. Its ``name`` is what vLLM loads it under and is
    never reused; its directory is immutable."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # candidate -> evaluating -> rejected | approved -> canary -> active -> retired
    state: Mapped[str] = mapped_column(String(16), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    # The round that trained it (no foreign key: rounds point at adapters, not both ways).
    round_id: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(SafeText())  # where the trainer wrote it (its host)
    # Where every host fetches it (file:// or s3://, server.store.artifacts) and the SHA-256 of
    # its files' checksum document; null for versions registered before artefacts had a URL.
    uri: Mapped[str | None] = mapped_column(SafeText(), default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    base_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class AdapterTransition(Base):
    """The audit trail of the registry: who or what moved an adapter between states, and why."""

    __tablename__ = "adapter_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(SafeString(200))  # "trainer", "gate", "ops:<token name>"
    reason: Mapped[str] = mapped_column(SafeText(), default="")
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class RolloutState(Base):
    """How traffic is split between adapter versions, and what runs on its own: one row."""

    __tablename__ = "rollout_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    canary_share: Mapped[float] = mapped_column(Float, default=0.1)
    # False: nothing is promoted or rolled back automatically (ops still can).
    auto_rollout: Mapped[bool] = mapped_column(Boolean, default=True)
    training_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # Every request for the base model name gets this version; no canary, no automatic moves.
    pinned_adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    canary_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    # The versions that were active before the current one, oldest first (null: the base
    # model): each promotion to active pushes, each rollback pops.
    active_history: Mapped[list[Any]] = mapped_column(JSON, default=list)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="")
