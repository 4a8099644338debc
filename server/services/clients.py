"""Editors that speak their own protocol, mapped onto Kaizen's completions and feedback.

- **Tabby** (tabby-agent: its VS Code, IntelliJ, Vim/Neovim and Eclipse plugins): a completion
  request of *segments* becomes a FIM request with repository context; its ``view``, ``select``
  and ``dismiss`` events become ``shown``, ``accepted`` (``partially_accepted`` for a line) and
  ``rejected``, and a ``select`` also writes the ledger entry that the agent cannot, from the
  served record, so CI attributes its tests to the completion.
- **Continue**: its completion requests are plain OpenAI requests (the FIM prompt it templates
  itself is split by the completion service); its *data* destination posts one event per
  completion, which carries no Kaizen id, so the event is matched to the served record by the
  token's owner, the model, the prompt's digest and a time window.

Events and ledger entries go through :class:`FeedbackService`, with its ownership checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.engine.fim import RepoFile
from server.errors import ApiError
from server.protocol.completions import CompletionRequest, IdeContext
from server.protocol.feedback import Event, EventBatch, LedgerBatch, LedgerEntryIn
from server.protocol.tabby import (
    TabbyChoice,
    TabbyCompletionRequest,
    TabbyCompletionResponse,
    TabbyEvent,
    TabbyHealth,
    TabbyLocalModel,
    TabbyModels,
    TabbyVersion,
)
from server.services.completions import CompletionService
from server.services.feedback import FeedbackService
from server.services.recorder import Recorder
from server.services.repo_context import RepoPrompt
from server.store.models import ApiToken, Completion
from server.store.repositories import normalised_or_none
from server.store.tokens import Principal

log = logging.getLogger(__name__)

# Event ids made by the server for Continue are derived from Continue's own completion id, so a
# data event that Continue retries is stored once.
_CONTINUE_NS = uuid.UUID("6f1b7d2e-2a4c-4c59-9d8e-4b0f3c1a7e55")


def _kaizen_version() -> str:
    try:
        return version("kaizen")
    except PackageNotFoundError:
        return "0.0.0"


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def _repo_name(repository: str | None) -> str:
    return repository.rsplit("/", 1)[-1] if repository else ""


@dataclass(frozen=True)
class _Served:
    """What a ledger entry is made from: the served record's choice and context."""

    text: str
    repository: str | None
    file_path: str | None


class ClientFeedback:
    """Turns a client's report into Kaizen events and, on acceptance, a ledger entry."""

    def __init__(
        self,
        *,
        feedback: FeedbackService,
        recorder: Recorder,
        session_factory: sessionmaker[Session],
    ) -> None:
        self.feedback = feedback
        self.recorder = recorder
        self.session_factory = session_factory

    async def served(self, completion_id: str, choice_index: int) -> _Served | None:
        await self.recorder.settle()  # the completion may be in this replica's queue still

        def work() -> _Served | None:
            with self.session_factory() as session:
                row = session.get(Completion, completion_id)
                if row is None:
                    return None
                texts = {c.index: c.text for c in row.choices}
                return _Served(texts.get(choice_index, ""), row.repository, row.file_path)

        return await asyncio.to_thread(work)

    async def report(
        self,
        principal: Principal,
        *,
        event_id: str,
        completion_id: str,
        choice_index: int,
        kind: str,
        inserted: str | None = None,
        accepted_length: int | None = None,
        served: _Served | None = None,
    ) -> None:
        """Store one event (raises the feedback API's 403/404 when it is not stored) and, for
        an acceptance with a known repository and file, the ledger entry."""
        now = datetime.now(UTC)
        event = Event(
            id=event_id,
            completion_id=completion_id,
            choice_index=choice_index,
            type=kind,  # type: ignore[arg-type]
            timestamp=now,
            accepted_length=accepted_length,
        )
        await self.feedback.record_events(EventBatch(events=[event]), principal)
        if kind not in ("accepted", "partially_accepted") or served is None:
            return
        text = served.text if inserted is None else inserted
        if not served.repository or not served.file_path:
            log.info("event=ledger_skipped id=%s reason=no_repository_or_file_path", completion_id)
            return
        entry = LedgerEntryIn(
            completion_id=completion_id,
            choice_index=choice_index,
            repository=served.repository,
            file_path=served.file_path,
            inserted_text=text,
            current_text=text,
            updated_at=now,
        )
        await self.feedback.put_ledger(LedgerBatch(entries=[entry]), principal)


# ------------------------------------------------------------------------------------- Tabby

_TABBY_EVENTS = {"view": "shown", "select": "accepted", "dismiss": "rejected"}


class TabbyService:
    def __init__(
        self,
        *,
        completions: CompletionService,
        feedback: ClientFeedback,
        settings: Settings,
    ) -> None:
        self.completions = completions
        self.feedback = feedback
        self.settings = settings

    def health(self) -> TabbyHealth:
        if not self.completions.is_ready():
            # The agent takes any non-2xx as "no connection" and checks again later.
            raise ApiError(
                503,
                "The model is still loading; Tabby's plugin reconnects by itself.",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )
        engine = self.completions.engine
        device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "") else "cpu"
        release = _kaizen_version()
        return TabbyHealth(
            model=engine.model_name,
            device=device,
            models=TabbyModels(
                completion={"local": TabbyLocalModel(model_id=engine.model_name, device=device)}
            ),
            arch=platform.machine(),
            cpu_info=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count() or 1,
            version=TabbyVersion(
                build_date="",
                build_timestamp="",
                git_sha="",
                git_describe=f"kaizen-v{release}",
            ),
        )

    def _request(self, body: TabbyCompletionRequest) -> tuple[CompletionRequest, RepoPrompt]:
        if body.mode != "standard":
            raise ApiError(
                400,
                f"Completion mode {body.mode!r} is not supported by Kaizen; only 'standard' "
                "(turn off next-edit suggestions in the Tabby plugin).",
                param="mode",
            )
        seg = body.segments
        repository = normalised_or_none(seg.git_url)
        files = [RepoFile(d.filepath, d.body) for d in seg.declarations or []]
        for snippets in (
            seg.relevant_snippets_from_changed_files,
            seg.relevant_snippets_from_recently_opened_files,
        ):
            files += [RepoFile(s.filepath, s.body) for s in snippets or []]
        request = CompletionRequest(
            model=self.completions.engine.model_name,
            prompt=seg.prefix,
            suffix=seg.suffix or "",
            max_tokens=self.settings.tabby_max_tokens,
            temperature=(
                self.settings.tabby_temperature if body.temperature is None else body.temperature
            ),
            seed=body.seed,
            context=IdeContext(
                language=body.language, file_path=seg.filepath, repository=repository
            ),
        )
        # Qwen's repository-level format wants a name; a workspace without a remote has none.
        repo = RepoPrompt(
            name=_repo_name(repository) or "workspace",
            files=tuple(files),
            file_path=seg.filepath,
        )
        return request, repo

    async def prepare(self, body: TabbyCompletionRequest, principal: Principal) -> Any:
        request, repo = self._request(body)
        return await self.completions.prepare_completion(request, principal, repo=repo)

    async def complete(self, job: Any) -> TabbyCompletionResponse:
        done = await self.completions.complete(job)
        return TabbyCompletionResponse(
            id=done.id, choices=[TabbyChoice(index=c.index, text=c.text) for c in done.choices]
        )

    async def event(self, body: TabbyEvent, select_kind: str | None, principal: Principal) -> None:
        kind = _TABBY_EVENTS[body.type]
        line = (select_kind or body.select_kind) == "line"
        served = None
        accepted_length = None
        inserted = None
        if kind == "accepted":
            served = await self.feedback.served(body.completion_id, body.choice_index)
            if served is not None and line:
                # "Accept line": the agent inserted the choice's first line only.
                inserted = _first_line(served.text)
                if inserted != served.text:
                    kind, accepted_length = "partially_accepted", len(inserted)
        await self.feedback.report(
            principal,
            event_id=str(uuid.uuid4()),
            completion_id=body.completion_id,
            choice_index=body.choice_index,
            kind=kind,
            inserted=inserted,
            accepted_length=accepted_length,
            served=served,
        )


# ---------------------------------------------------------------------------------- Continue


@dataclass
class SinkResult:
    """What the data destination answers (always 2xx: Continue only logs a failure)."""

    stored: bool
    completion_id: str | None
    detail: str


def _relative_path(uri: str, repo_name: str | None) -> str | None:
    """A repository-relative path from Continue's ``filepath`` (a ``file://`` URI of the
    workspace): the part after the repository's directory, found by its name."""
    path = unquote(urlsplit(uri).path) if "://" in uri else uri
    path = path.replace("\\", "/")
    if repo_name:
        marker = f"/{repo_name}/"
        at = path.rfind(marker)
        if at != -1:
            return path[at + len(marker) :] or None
    return path.rsplit("/", 1)[-1] or None


class ContinueSink:
    def __init__(
        self,
        *,
        feedback: ClientFeedback,
        session_factory: sessionmaker[Session],
        settings: Settings,
    ) -> None:
        self.feedback = feedback
        self.session_factory = session_factory
        self.settings = settings

    def _repository(self, git_repo: str | None) -> str | None:
        """Continue sends ``owner/name`` of ``origin`` (host dropped); CI knows the repository
        as ``host/owner/name``."""
        if not git_repo:
            return None
        value = git_repo.strip()
        if "://" not in value and "@" not in value and value.count("/") == 1:
            value = f"{self.settings.continue_repository_host}/{value}"
        return normalised_or_none(value)

    async def _match(
        self, principal: Principal, *, model: str, prompt: str, completion: str
    ) -> str | None:
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        since = datetime.now(UTC) - timedelta(seconds=self.settings.continue_match_window_seconds)

        def work() -> str | None:
            with self.session_factory() as session:
                rows = session.execute(
                    select(Completion, ApiToken.name)
                    .outerjoin(ApiToken, ApiToken.id == Completion.token_id)
                    .where(
                        Completion.endpoint == "completions",
                        Completion.model == model,
                        Completion.created_at >= since,
                    )
                    .order_by(Completion.created_at.desc())
                    .limit(500)
                )
                candidates = [
                    row
                    for row, owner in rows
                    if (row.params or {}).get("prompt_sha256") == digest
                    and principal.owns(token_id=row.token_id, owner=owner)
                ]
                # The same prompt served twice (a re-triggered completion): the newest whose
                # text is what Continue showed, else the newest.
                for row in candidates:
                    if any(c.text and completion.startswith(c.text) for c in row.choices):
                        return row.id
                    if any(completion and c.text.startswith(completion) for c in row.choices):
                        return row.id
                return candidates[0].id if candidates else None

        return await asyncio.to_thread(work)

    async def _place(self, completion_id: str, repository: str | None, file_path: str | None):  # type: ignore[no-untyped-def]
        """Give a served record that came without context (Continue sends none with the
        request) the repository and file of its data event, so scoped ci tokens cover it.
        Only empty fields are filled: what a client sent with the request stands."""

        def work() -> None:
            with self.session_factory() as session:
                row = session.get(Completion, completion_id)
                if row is None:
                    return
                if row.repository is None and repository:
                    row.repository = repository
                if row.file_path is None and file_path:
                    row.file_path = file_path
                session.commit()

        await asyncio.to_thread(work)

    async def receive(self, payload: Any, principal: Principal) -> SinkResult:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return SinkResult(False, None, "Not a Continue data event ({name, data, schema}).")
        if payload.get("name") != "autocomplete":
            return SinkResult(False, None, f"Event {payload.get('name')!r} is not used.")
        data: dict[str, Any] = payload["data"]
        accepted = data.get("accepted")
        prompt, model = data.get("prompt"), data.get("modelName")
        if not isinstance(accepted, bool):
            return SinkResult(False, None, "The event says neither accepted nor rejected.")
        if not isinstance(prompt, str) or not isinstance(model, str):
            return SinkResult(
                False,
                None,
                "The event has no prompt or modelName: set `level: all` on the data "
                "destination (level noCode leaves out the prompt Kaizen matches on).",
            )
        completion = data.get("completion") if isinstance(data.get("completion"), str) else ""
        await self.feedback.recorder.settle()  # the completion may be in this replica's queue
        matched = await self._match(principal, model=model, prompt=prompt, completion=completion)
        if matched is None:
            return SinkResult(
                False,
                None,
                "No completion served to this token's owner in the last "
                f"{self.settings.continue_match_window_seconds:g} s has this model and prompt.",
            )
        continue_id = str(data.get("completionId") or "")
        repository = self._repository(data.get("gitRepo"))
        filepath = data.get("filepath") if isinstance(data.get("filepath"), str) else ""
        file_path = _relative_path(filepath, _repo_name(repository)) if filepath else None
        if accepted:
            await self._place(matched, repository, file_path)
        served = await self.feedback.served(matched, 0) if accepted else None
        kind = "accepted" if accepted else "rejected"
        event_id = str(uuid.uuid5(_CONTINUE_NS, f"{continue_id or matched}:{kind}"))
        try:
            await self.feedback.report(
                principal,
                event_id=event_id,
                completion_id=matched,
                choice_index=0,
                kind=kind,
                inserted=completion or None,
                served=served,
            )
        except ApiError as exc:
            return SinkResult(False, matched, exc.message)
        return SinkResult(True, matched, f"Stored as {kind}.")
