"""The completion service: validates a request, builds the prompt, picks the adapter, runs the
engine, shapes the response (JSON or server-sent events) and records the outcome.

Every request that reaches the engine produces exactly one record, whether it completes, the
client goes away (``aborted``) or the engine fails (``failed``): the record is submitted in the
``finally`` of the one generator that drives the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from server.config import Settings
from server.engine.base import (
    ChoiceDelta,
    Engine,
    EngineNotReadyError,
    GenerationParams,
    UnknownAdapterError,
)
from server.engine.fim import (
    FIM_END_TOKENS,
    FimFormat,
    block_stops,
    split_fim_prompt,
    suffix_stops,
)
from server.errors import ApiError
from server.protocol.completions import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)
from server.services.metrics import Metrics, route_label
from server.services.recorder import Recorder
from server.services.repo_context import PromptDoesNotFitError, RepoPrompt, fit_prompt
from server.services.routing import Router
from server.store.completions import ChoiceRecord, CompletionRecord
from server.store.tokens import Principal

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# vLLM decodes greedily below this temperature (vllm.sampling_params._SAMPLING_EPS).
GREEDY_BELOW = 1e-5


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


@dataclass
class _Job:
    """One request on its way through the engine, and the record it will leave."""

    record: CompletionRecord
    prompt_token_ids: list[int]
    params: GenerationParams
    started: float  # time.perf_counter() when the request arrived
    include_usage: bool

    @property
    def usage(self) -> Usage:
        done = self.record.completion_tokens
        return Usage(
            prompt_tokens=self.record.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.record.prompt_tokens + done,
        )


class CompletionService:
    def __init__(
        self,
        *,
        engine: Engine,
        recorder: Recorder,
        settings: Settings,
        fim: FimFormat | None = None,
        router: Router | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.router = router
        self.metrics = metrics
        self.recorder = recorder
        self.settings = settings
        self.fim = fim or FimFormat()
        self._end_ids: list[int] | None = None

    # ------------------------------------------------------------------ models

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=self.engine.model_name, root=self.engine.model_name)]
        cards += [
            ModelCard(id=a.name, root=a.path, parent=self.engine.model_name)
            for a in self.engine.adapters()
        ]
        return ModelList(data=cards)

    def _resolve_adapter(self, model: str, principal: Principal) -> str | None:
        """The adapter a request runs on, decided once: the one it names, or, for the base
        model's name, the version rollout routes this token to (None: the base itself)."""
        if model == self.engine.model_name:
            return self.router.route(principal) if self.router is not None else None
        if any(a.name == model for a in self.engine.adapters()):
            return model
        raise ApiError(
            404,
            f"The model '{model}' does not exist. GET /v1/models lists the base "
            "model and the adapters this server serves.",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------- validation

    def is_ready(self) -> bool:
        """The engine can serve and, with rollout, the registry's versions are loaded (so the
        first requests do not fall back to the base model)."""
        return self.engine.is_ready() and (self.router is None or self.router.synced)

    def _check_ready(self) -> None:
        if not self.is_ready():
            raise ApiError(
                503,
                "The model is still loading (or failed to load); retry when "
                "GET /readyz answers 200.",
                code="engine_not_ready",
                headers={"Retry-After": "5"},
            )

    def _check_common(self, request: SamplingRequest) -> None:
        if request.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs is not supported by this server.", param="logprobs")
        if request.n > self.settings.max_n:
            raise ApiError(400, f"n must be at most {self.settings.max_n}.", param="n")
        if request.n > 1 and request.temperature < GREEDY_BELOW:
            # vLLM refuses this (greedy decoding would give n identical choices).
            raise ApiError(
                400,
                f"n={request.n} needs sampling, but temperature {request.temperature:g} means "
                "greedy decoding, which gives every choice the same text: send n=1, or a "
                "temperature above 0.",
                param="n",
            )

    def _check_chars(self, length: int, *, param: str) -> None:
        """Refuse a prompt that cannot fit the context even at ``prompt_chars_per_token``
        characters per token, before spending any time on tokenising it."""
        context = self.engine.max_model_len
        limit = int(context * self.settings.prompt_chars_per_token)
        if length > limit:
            raise ApiError(
                400,
                f"The prompt is {length} characters long; with this model's context of "
                f"{context} tokens this server accepts at most {limit} characters. "
                "Send less context.",
                param=param,
                code="context_length_exceeded",
            )

    async def _tokenize(self, text: str, *, param: str) -> list[int]:
        """Token ids of a prompt, in a worker thread: a long prompt takes long enough to
        tokenise that it would stall every other request (and /healthz) on the event loop."""
        self._check_chars(len(text), param=param)
        return await asyncio.to_thread(self.engine.tokenize, text)

    def _max_tokens(self, requested: int | None, prompt_tokens: int, *, clamp: bool = False) -> int:
        limit = self.settings.max_tokens_limit
        context = self.engine.max_model_len
        if prompt_tokens >= context:
            raise ApiError(
                400,
                f"The prompt is {prompt_tokens} tokens long; this model's context "
                f"is {context} tokens. Send less context.",
                param="prompt",
                code="context_length_exceeded",
            )
        if requested is not None and clamp:
            # For clients that always ask for far more than fits (Continue: 4096).
            requested = min(requested, limit, context - prompt_tokens)
        if requested is None:
            return min(self.settings.default_max_tokens, context - prompt_tokens)
        if requested > limit:
            raise ApiError(
                400,
                f"max_tokens is {requested}; this server allows at most {limit}.",
                param="max_tokens",
            )
        if prompt_tokens + requested > context:
            total = prompt_tokens + requested
            raise ApiError(
                400,
                f"This model's context is {context} tokens, but {total} "
                f"were requested ({prompt_tokens} in the prompt, {requested} for the "
                "completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def _end_token_ids(self) -> list[int]:
        # Looked up once the engine's tokenizer is loaded, not on every request.
        if self._end_ids is None:
            ids = (self.engine.special_token_id(t) for t in FIM_END_TOKENS)
            self._end_ids = [i for i in ids if i is not None]
        return self._end_ids

    def _new_job(
        self,
        *,
        request: SamplingRequest,
        endpoint: str,
        principal: Principal,
        prompt_text: str,
        prompt_ids: list[int],
        max_tokens: int,
        stop: list[str],
        stop_token_ids: list[int],
        started: float,
        adapter: str | None,
        suffix: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        extra_params: dict[str, Any] | None = None,
    ) -> _Job:
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            n=request.n,
            stop=tuple(stop),
            stop_token_ids=tuple(stop_token_ids),
            seed=request.seed,
        )
        prefix = "cmpl" if endpoint == "completions" else "chatcmpl"
        context = request.context.model_dump() if request.context else {}
        record = CompletionRecord(
            id=f"{prefix}-{uuid.uuid4().hex}",
            created_at=datetime.now(UTC),
            token_id=principal.token_id,
            endpoint=endpoint,
            model=request.model,
            adapter=adapter,
            prompt=prompt_text,
            suffix=suffix,
            messages=messages,
            stream=request.stream,
            prompt_tokens=len(prompt_ids),
            params={
                "max_tokens": max_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "n": request.n,
                "stop": stop,
                "seed": request.seed,
                **self._extra_params(request),
                **(extra_params or {}),
            },
            context=context,
            choices=[ChoiceRecord(index=i) for i in range(request.n)],
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _Job(
            record=record,
            prompt_token_ids=prompt_ids,
            params=params,
            started=started,
            include_usage=include_usage,
        )

    @staticmethod
    def _extra_params(request: SamplingRequest) -> dict[str, Any]:
        if isinstance(request, CompletionRequest):
            return {"single_line": request.single_line}
        return {}

    # ------------------------------------------------------------ completions

    def _has_fim(self) -> bool:
        return all(self.engine.special_token_id(t) is not None for t in self.fim.tokens())

    async def prepare_completion(
        self, request: CompletionRequest, principal: Principal, *, repo: RepoPrompt | None = None
    ) -> _Job:
        """``repo``: a fill-in-the-middle request with other files of the repository (Tabby's
        segments), always FIM, trimmed to fit the context instead of refused."""
        started = time.perf_counter()
        self._check_common(request)
        if request.echo:
            raise ApiError(400, "echo is not supported by this server.", param="echo")
        if request.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported; use n.", param="best_of")
        if isinstance(request.prompt, list):
            if len(request.prompt) != 1:
                raise ApiError(
                    400,
                    "Send one prompt per request (a list of prompts is not supported).",
                    param="prompt",
                )
            prompt = request.prompt[0]
        else:
            prompt = request.prompt
        suffix = request.suffix or None
        if not prompt and not suffix:
            raise ApiError(
                400,
                "The prompt is empty; send the text before the cursor "
                "(and the text after it as suffix).",
                param="prompt",
            )
        adapter = self._resolve_adapter(request.model, principal)
        self._check_ready()
        stop = request.stop_list()
        fim_context = ""
        extra: dict[str, Any] = {}
        if suffix is None and repo is None:
            # Finds the record from a client's report that names the prompt, not the id
            # (Continue's data events), whatever template the client used.
            extra["prompt_sha256"] = hashlib.sha256(prompt.encode()).hexdigest()
            split = split_fim_prompt(prompt, self.fim) if self._has_fim() else None
            if split is not None:
                # The client templated the infill itself (Continue): the model gets the prompt
                # as sent; the record gets its parts, so the trainer sees prefix and suffix and
                # the suffix stops apply.
                prompt, suffix, fim_context = split.prefix, split.suffix, split.context
        if repo is not None:
            suffix = suffix or ""
        if suffix is not None and not self._has_fim():
            raise ApiError(
                400,
                f"The model {self.engine.model_name} has no fill-in-the-middle "
                "tokens, so `suffix` is not supported.",
                param="suffix",
            )
        clamp = request.clamp_max_tokens or self.settings.clamp_max_tokens
        if repo is not None:
            prompt, suffix, fim_context, prompt_ids = await self._fit(request, repo, prompt, suffix)
        else:
            text = prompt if suffix is None else self.fim.build(prompt, suffix, fim_context)
            prompt_ids = await self._tokenize(text, param="prompt")
        if suffix is not None:
            stop += suffix_stops(suffix)
        language = request.context.language if request.context else None
        stop += [s for s in block_stops(prompt, language) if s not in stop]
        if request.single_line:
            stop.append("\n")
        if fim_context:
            extra["fim_context"] = fim_context  # before <|fim_prefix|>: part of the prompt
        max_tokens = self._max_tokens(request.max_tokens, len(prompt_ids), clamp=clamp)
        if max_tokens != request.max_tokens and request.max_tokens is not None:
            extra["requested_max_tokens"] = request.max_tokens
        return self._new_job(
            request=request,
            endpoint="completions",
            principal=principal,
            prompt_text=prompt,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=self._end_token_ids(),
            started=started,
            adapter=adapter,
            suffix=suffix,
            extra_params=extra,
        )

    async def _fit(
        self, request: CompletionRequest, repo: RepoPrompt, prefix: str, suffix: str
    ) -> tuple[str, str, str, list[int]]:
        """Prefix, suffix, FIM context and prompt ids of ``repo``'s request, trimmed to leave
        room for the completion (server/services/repo_context.py says what goes first)."""
        context = self.engine.max_model_len
        wanted = min(
            request.max_tokens or self.settings.default_max_tokens,
            self.settings.max_tokens_limit,
        )
        try:
            fitted = await fit_prompt(
                fim=self.fim,
                prefix=prefix,
                suffix=suffix,
                repo_name=repo.name,
                files=repo.files,
                file_path=repo.file_path,
                max_tokens=max(context - wanted, 1),
                max_chars=int(context * self.settings.prompt_chars_per_token),
                count=lambda text: asyncio.to_thread(self.engine.tokenize, text),
            )
        except PromptDoesNotFitError as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from exc
        return fitted.prefix, fitted.suffix, fitted.context, fitted.token_ids

    async def complete(self, job: _Job) -> CompletionResponse:
        await self._drain(job)
        return CompletionResponse(
            id=job.record.id,
            model=job.record.model,
            usage=job.usage,
            created=int(job.record.created_at.timestamp()),
            choices=[
                CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason)
                for c in job.record.choices
            ],
        )

    def stream_completion(self, job: _Job) -> AsyncIterator[str]:
        created = int(job.record.created_at.timestamp())

        def chunks(deltas: list[ChoiceDelta]) -> list[BaseModel]:
            return [
                CompletionResponse(
                    id=job.record.id,
                    model=job.record.model,
                    created=created,
                    choices=[
                        CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
                    ],
                )
                for d in deltas
                if d.text or d.finish_reason
            ]

        def usage_chunk() -> BaseModel:
            return CompletionResponse(
                id=job.record.id,
                model=job.record.model,
                created=created,
                choices=[],
                usage=job.usage,
            )

        return self._stream(job, chunks, usage_chunk, first=None)

    # ------------------------------------------------------------------- chat

    async def prepare_chat(self, request: ChatCompletionRequest, principal: Principal) -> _Job:
        started = time.perf_counter()
        self._check_common(request)
        if not request.messages:
            raise ApiError(400, "messages must not be empty.", param="messages")
        adapter = self._resolve_adapter(request.model, principal)
        self._check_ready()
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        # The character bound first, so a huge conversation is not even templated.
        self._check_chars(sum(len(m["content"]) for m in messages), param="messages")
        prompt_text = await asyncio.to_thread(self.engine.apply_chat_template, messages)
        prompt_ids = await self._tokenize(prompt_text, param="messages")
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = self._max_tokens(requested, len(prompt_ids))
        return self._new_job(
            request=request,
            endpoint="chat",
            principal=principal,
            prompt_text=prompt_text,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stop=request.stop_list(),
            stop_token_ids=[],
            started=started,
            adapter=adapter,
            messages=messages,
        )

    async def chat(self, job: _Job) -> ChatCompletionResponse:
        await self._drain(job)
        return ChatCompletionResponse(
            id=job.record.id,
            model=job.record.model,
            usage=job.usage,
            created=int(job.record.created_at.timestamp()),
            choices=[
                ChatChoice(
                    index=c.index,
                    message=ChatMessageOut(content=c.text),
                    finish_reason=c.finish_reason,
                )
                for c in job.record.choices
            ],
        )

    def stream_chat(self, job: _Job) -> AsyncIterator[str]:
        created = int(job.record.created_at.timestamp())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> BaseModel:
            return ChatCompletionChunk(
                id=job.record.id,
                model=job.record.model,
                created=created,
                choices=choices,
                usage=usage,
            )

        def chunks(deltas: list[ChoiceDelta]) -> list[BaseModel]:
            return [
                chunk(
                    [
                        ChatChunkChoice(
                            index=d.index,
                            delta=ChatDelta(content=d.text),
                            finish_reason=d.finish_reason,
                        )
                    ]
                )
                for d in deltas
                if d.text or d.finish_reason
            ]

        first = [
            chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(job.params.n)
        ]
        return self._stream(job, chunks, lambda: chunk([], job.usage), first=first)

    # ---------------------------------------------------------------- running

    async def _run(self, job: _Job) -> AsyncIterator[list[ChoiceDelta]]:
        """Drive the engine for ``job``, keep its record current, and submit the record once."""
        record = job.record
        status, error = "failed", None
        routing = self.router.routing if self.router is not None else None
        route = route_label(routing, record.adapter)  # as it starts: a swap does not relabel it
        if self.router is not None:
            self.router.acquire(record.adapter)  # keeps the version loaded until we finish
        try:
            async for deltas in self.engine.generate(
                request_id=record.id,
                prompt_token_ids=job.prompt_token_ids,
                params=job.params,
                adapter=record.adapter,
            ):
                if record.ttft_ms is None and any(d.token_count for d in deltas):
                    record.ttft_ms = (time.perf_counter() - job.started) * 1000
                for delta in deltas:
                    choice = record.choices[delta.index]
                    choice.text += delta.text
                    choice.tokens += delta.token_count
                    if delta.finish_reason is not None:
                        choice.finish_reason = delta.finish_reason
                yield deltas
            aborted = any(c.finish_reason == "abort" for c in record.choices)
            status = "aborted" if aborted else "completed"
        except BaseException as exc:  # CancelledError/GeneratorExit: the client went away
            if isinstance(exc, Exception):
                error = f"{type(exc).__name__}: {exc}"
            else:
                status = "aborted"
            raise
        finally:
            if self.router is not None:
                self.router.release(record.adapter)
            record.status = status
            record.error = error
            record.latency_ms = (time.perf_counter() - job.started) * 1000
            self.recorder.submit(record)
            if self.metrics is not None:
                self.metrics.observe_completion(record, route)
            log.info(
                "event=completion id=%s status=%s adapter=%s prompt_tokens=%d "
                "completion_tokens=%d ttft_ms=%s latency_ms=%.1f",
                record.id,
                status,
                record.adapter,
                record.prompt_tokens,
                record.completion_tokens,
                f"{record.ttft_ms:.1f}" if record.ttft_ms is not None else "-",
                record.latency_ms,
            )

    async def _drain(self, job: _Job) -> None:
        try:
            async with aclosing(self._run(job)) as deltas:
                async for _ in deltas:
                    pass
        except EngineNotReadyError as exc:
            raise ApiError(503, str(exc), code="engine_not_ready") from exc
        except UnknownAdapterError as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from exc
        except Exception as exc:
            log.exception("event=generation_failed id=%s", job.record.id)
            raise ApiError(500, f"Generation failed: {exc}", code="generation_failed") from exc

    async def _stream(
        self,
        job: _Job,
        chunks: Callable[[list[ChoiceDelta]], list[BaseModel]],
        usage_chunk: Callable[[], BaseModel],
        first: list[BaseModel] | None,
    ) -> AsyncIterator[str]:
        for payload in first or []:
            yield sse(payload)
        try:
            async with aclosing(self._run(job)) as deltas:
                async for batch in deltas:
                    for payload in chunks(batch):
                        yield sse(payload)
            if job.include_usage:
                yield sse(usage_chunk())
        except Exception as exc:
            # Headers are gone already: report the failure in-band, then end the stream.
            log.exception("event=stream_failed id=%s", job.record.id)
            yield sse(
                ErrorResponse(
                    error=ErrorDetail(
                        message=f"Generation failed: {exc}",
                        type="api_error",
                        code="generation_failed",
                    )
                )
            )
        yield SSE_DONE
