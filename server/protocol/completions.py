"""Request and response models of the OpenAI-compatible API (plus Kaizen's optional fields)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class IdeContext(BaseModel):
    """Where a completion was asked for; recorded with it, never sent to the model."""

    model_config = ConfigDict(extra="ignore")

    language: str | None = Field(None, max_length=64)
    file_path: str | None = Field(None, max_length=4096)
    repository: str | None = Field(None, max_length=4096)


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI allows 4; Continue's default autocomplete sends 12 (its FIM template's end tokens plus
# its own), so Kaizen takes more. vLLM checks each stop string as text is generated: cheap.
MAX_STOP = 16


class SamplingRequest(BaseModel):
    # Clients such as the openai library send fields we do not use (user, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)  # the spec's maximum is KAIZEN_MAX_N (server/api/openapi.py)
    stop: str | Annotated[list[str], Field(json_schema_extra={"maxItems": MAX_STOP})] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM seeds a torch generator, which takes an unsigned or a signed 64-bit integer.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    # Refused unless off; the schema says so while the service's message explains it.
    logprobs: Any = Field(None, json_schema_extra={"enum": [None, False, 0]})
    context: IdeContext | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return value

    def stop_list(self) -> list[str]:
        return [s for s in (self.stop or []) if s]  # type: ignore[union-attr]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``. With ``suffix``, the prompt is the text before the cursor."""

    # OpenAI's list form is accepted with exactly one prompt.
    prompt: str | Annotated[list[str], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]
    suffix: str | None = None
    # Not supported: the schema admits only the values that mean "off".
    echo: bool = Field(False, json_schema_extra={"enum": [False]})
    best_of: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 1})
    single_line: bool = Field(False, description="Kaizen: stop at the end of the line.")
    clamp_max_tokens: bool = Field(
        False,
        description="Kaizen: lower a max_tokens that does not fit (over the server's limit, or "
        "past the context) to what fits, instead of a 400. KAIZEN_CLAMP_MAX_TOKENS turns it on "
        "for every request.",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kaizen"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
