"""Completion records: written in batches by the recorder, read by ops and the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.store.models import Completion, RecordedChoice


@dataclass
class ChoiceRecord:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class CompletionRecord:
    """Everything the server knows about one completion request when it ends."""

    id: str
    created_at: datetime
    token_id: int | None
    endpoint: str
    model: str
    adapter: str | None
    prompt: str
    params: dict[str, Any]
    stream: bool
    status: str = "completed"
    suffix: str | None = None
    messages: list[dict[str, Any]] | None = None
    error: str | None = None
    prompt_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    context: dict[str, str | None] = field(default_factory=dict)
    choices: list[ChoiceRecord] = field(default_factory=list)
    # "serve", or "resample" for an alternative sampled for CI from ``parent_id``'s context.
    source: str = "serve"
    parent_id: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


def save_completions(*, session: Session, records: Sequence[CompletionRecord]) -> None:
    """Insert a batch of records in one transaction."""
    for record in records:
        row = Completion(
            id=record.id,
            created_at=record.created_at,
            token_id=record.token_id,
            endpoint=record.endpoint,
            model=record.model,
            adapter=record.adapter,
            prompt=record.prompt,
            suffix=record.suffix,
            messages=record.messages,
            params=record.params,
            stream=record.stream,
            status=record.status,
            error=record.error,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            ttft_ms=record.ttft_ms,
            latency_ms=record.latency_ms,
            language=record.context.get("language"),
            file_path=record.context.get("file_path"),
            repository=record.context.get("repository"),
            source=record.source,
            parent_id=record.parent_id,
        )
        row.choices = [
            RecordedChoice(
                index=c.index, text=c.text, finish_reason=c.finish_reason, tokens=c.tokens
            )
            for c in record.choices
        ]
        session.add(row)
    session.commit()


def get_completion(*, session: Session, completion_id: str) -> Completion | None:
    return session.get(Completion, completion_id)


def count_completions(*, session: Session, status: str | None = None) -> int:
    query = select(func.count()).select_from(Completion)
    if status is not None:
        query = query.where(Completion.status == status)
    return session.scalar(query) or 0
