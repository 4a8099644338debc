"""Alternatives for CI-side exploration: sample again from a served completion's recorded context.

A project's own CI is the only place that can run its tests, so the pytest plugin asks here for
``n`` alternatives of a completion that has a verdict on one side only, splices each into the
checkout and reports its verdict as an outcome (``plugins/PROTOCOL.md``, "Exploration"). The
alternatives go through :class:`~server.services.completions.CompletionService` like any
request, with the recorded prompt, suffix, stops, ``max_tokens`` and ``single_line``, and are
recorded as one completion with ``source`` ``resample`` and ``parent_id`` the explored one, so
the trainer joins them to the parent's context (same prompt and suffix) and their outcomes to
CI's verdicts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.engine.fim import block_stops, suffix_stops
from server.errors import ApiError
from server.protocol.completions import CompletionRequest, IdeContext
from server.protocol.feedback import AlternativeOut, ResampleRequest, ResampleResponse
from server.services.completions import GREEDY_BELOW, CompletionService
from server.store.models import Completion, RecordedChoice
from server.store.tokens import Principal

log = logging.getLogger(__name__)

MAX_ALTERNATIVES_PER_COMPLETION = 32
"""Alternatives sampled for one served completion over all CI runs: bounds what a CI token can
make the server generate for a context, whatever its runs ask."""
DEFAULT_TEMPERATURE = 0.8


@dataclass(frozen=True)
class _Parent:
    """What the service needs of the explored completion's record."""

    id: str
    endpoint: str
    source: str
    status: str
    repository: str | None
    language: str | None
    file_path: str | None
    prompt: str
    suffix: str | None
    params: dict[str, object]
    choices: int
    alternatives: int  # already sampled for it


class ResampleService:
    def __init__(
        self, completions: CompletionService, session_factory: sessionmaker[Session]
    ) -> None:
        self.completions = completions
        self._session_factory = session_factory

    def _load(self, completion_id: str) -> _Parent | None:
        with self._session_factory() as session:
            row = session.get(Completion, completion_id)
            if row is None:
                return None
            done = session.scalar(
                select(func.count())
                .select_from(RecordedChoice)
                .join(Completion, Completion.id == RecordedChoice.completion_id)
                .where(Completion.parent_id == completion_id)
            )
            return _Parent(
                id=row.id,
                endpoint=row.endpoint,
                source=row.source,
                status=row.status,
                repository=row.repository,
                language=row.language,
                file_path=row.file_path,
                prompt=row.prompt,
                suffix=row.suffix,
                params=dict(row.params or {}),
                choices=len(row.choices),
                alternatives=int(done or 0),
            )

    async def resample(self, body: ResampleRequest, principal: Principal) -> ResampleResponse:
        """Sample ``body.n`` alternatives of ``body.completion_id``'s context and record them."""
        # The recorder may still hold the parent's record (a completion served a moment ago).
        await self.completions.recorder.settle()
        parent = await asyncio.to_thread(self._load, body.completion_id)
        if parent is None:
            raise ApiError(
                404,
                f"No completion {body.completion_id!r} on this server: send the `id` of a "
                "/v1/completions response (the ledger's completion_id).",
                param="completion_id",
                code="unknown_completion",
            )
        # Judged by the served record, as outcomes are: a scoped CI token explores only
        # completions served in its repositories (a completion served without one: none).
        if not principal.covers(parent.repository):
            raise ApiError(
                403,
                f"Completion {parent.id} was served in a repository this token does not cover. "
                "Explore it with a ci token scoped to that repository (`kaizen tokens create "
                "--role ci --name NAME --repo REPO`).",
                param="completion_id",
                code="repository_not_in_scope",
            )
        self._check_explorable(parent, body)
        left = MAX_ALTERNATIVES_PER_COMPLETION - parent.alternatives
        if left <= 0:
            raise ApiError(
                429,
                f"Completion {parent.id} already has {parent.alternatives} alternatives, the "
                f"most this server samples for one completion ({MAX_ALTERNATIVES_PER_COMPLETION})"
                ": explore other completions.",
                param="completion_id",
                code="alternatives_exhausted",
                headers={"Retry-After": "86400"},
            )
        n = min(body.n, left, self.completions.settings.max_n)
        request = self._request(parent, body, n)
        adapter = self._learning_adapter()
        job = await self.completions.prepare_completion(request, principal)
        # The version the next round trains from samples (not the canary this token might be
        # routed to): its own mistakes and successes are what it learns from.
        job.record.adapter = adapter
        job.record.model = adapter or self.completions.engine.model_name
        job.record.source = "resample"
        job.record.parent_id = parent.id
        response = await self.completions.complete(job)
        log.info(
            "event=resample parent=%s id=%s n=%d adapter=%s token=%d",
            parent.id,
            response.id,
            n,
            adapter,
            principal.token_id,
        )
        return ResampleResponse(
            id=response.id,
            parent_id=parent.id,
            adapter=adapter,
            alternatives=[
                AlternativeOut(index=c.index, text=c.text, finish_reason=c.finish_reason)
                for c in response.choices
            ],
            remaining=max(left - n, 0),
        )

    @staticmethod
    def _check_explorable(parent: _Parent, body: ResampleRequest) -> None:
        why = None
        if parent.endpoint != "completions":
            why = "it is a chat completion (only code completions are spliced into a file)"
        elif parent.source != "serve":
            why = f"it is itself an alternative of {parent.id}: explore the served completion"
        elif parent.status != "completed":
            why = f"its generation did not complete ({parent.status})"
        elif body.choice_index >= parent.choices:
            why = f"it has no choice {body.choice_index}"
        if why is not None:
            raise ApiError(
                400,
                f"Completion {parent.id} cannot be explored: {why}.",
                param="completion_id",
                code="not_explorable",
            )

    def _request(self, parent: _Parent, body: ResampleRequest, n: int) -> CompletionRequest:
        """The served request again, from its record: the same prompt the model saw (a
        client-templated or repository-level prompt is rebuilt with its ``fim_context``), the
        client's own stops (the server adds the suffix's and ``single_line``'s again), the
        same ``max_tokens``, ``top_p`` and ``single_line``."""
        params = parent.params
        single_line = bool(params.get("single_line", False))
        stops = [str(s) for s in params.get("stop") or []]  # type: ignore[union-attr]
        # The server appended, in this order: the suffix's stops, the block stops not already
        # there, then "\n" for single_line; it adds them again, so only the client's are kept.
        if single_line and stops[-1:] == ["\n"]:
            stops.pop()
        block = set(block_stops(parent.prompt, parent.language))
        while stops and stops[-1] in block:
            stops.pop()
        derived = len(suffix_stops(parent.suffix)) if parent.suffix is not None else 0
        client_stops = stops[: max(len(stops) - derived, 0)]
        fim_context = params.get("fim_context")
        prompt, suffix = parent.prompt, parent.suffix
        if isinstance(fim_context, str) and fim_context and suffix is not None:
            prompt, suffix = self.completions.fim.build(prompt, suffix, fim_context), None
        served_temperature = params.get("temperature")
        if body.temperature is not None:
            temperature = body.temperature
        elif isinstance(served_temperature, int | float) and served_temperature >= GREEDY_BELOW:
            temperature = float(served_temperature)
        else:
            temperature = DEFAULT_TEMPERATURE
        max_tokens = params.get("max_tokens")
        top_p = params.get("top_p")
        return CompletionRequest(
            model=self.completions.engine.model_name,
            prompt=prompt,
            suffix=suffix,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            temperature=temperature,
            top_p=float(top_p) if isinstance(top_p, int | float) and top_p > 0 else 1.0,
            n=n,
            stop=client_stops or None,
            single_line=single_line,
            clamp_max_tokens=True,
            context=IdeContext(
                language=parent.language,
                file_path=parent.file_path,
                repository=parent.repository,
            ),
        )

    def _learning_adapter(self) -> str | None:
        router = self.completions.router
        return router.routing.active if router is not None else None
