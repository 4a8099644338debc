"""ORM models. API schemas live apart, in ``server/api/protocol.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    """A bearer token. Only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # The first characters of the secret, so a person can tell tokens apart in a listing.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class Completion(Base):
    """One request to /v1/completions or /v1/chat/completions, whatever its fate."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(16))  # "completions" | "chat"
    model: Mapped[str] = mapped_column(String(200))  # what the client asked for
    adapter: Mapped[str | None] = mapped_column(String(200), index=True)  # None: base model
    prompt: Mapped[str] = mapped_column(Text)
    suffix: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    stream: Mapped[bool] = mapped_column(Boolean)
    # "completed": every choice finished; "aborted": the client went away;
    # "failed": the engine or server failed the request.
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    language: Mapped[str | None] = mapped_column(String(64))
    file_path: Mapped[str | None] = mapped_column(Text)
    repository: Mapped[str | None] = mapped_column(Text)

    choices: Mapped[list[CompletionChoice]] = relationship(
        back_populates="completion", order_by="CompletionChoice.index", lazy="selectin"
    )


class CompletionChoice(Base):
    """The text handed out for one choice of a completion (after post-processing)."""

    __tablename__ = "completion_choices"

    completion_id: Mapped[str] = mapped_column(
        ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    tokens: Mapped[int] = mapped_column(Integer, default=0)

    completion: Mapped[Completion] = relationship(back_populates="choices")
