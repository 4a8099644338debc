"""Request and response models of the feedback API (``plugins/PROTOCOL.md`` is the contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

RunStatus = Literal["passed", "failed", "build_failed", "error"]
TestStatus = Literal["passed", "failed", "error", "skipped"]
EventType = Literal["shown", "accepted", "partially_accepted", "rejected", "edited"]

MAX_TEXT = 200_000  # characters of one region's text
MAX_LOG_TAIL = 65_536


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(_Strict):
    id: str = Field(min_length=8, max_length=64)
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    type: EventType
    timestamp: AwareDatetime
    accepted_length: int | None = Field(None, ge=0)
    text: str | None = Field(None, max_length=MAX_TEXT)

    @model_validator(mode="after")
    def _fields_for_type(self) -> Self:
        if self.type == "partially_accepted" and self.accepted_length is None:
            raise ValueError("a partially_accepted event needs accepted_length")
        if self.type == "edited" and self.text is None:
            raise ValueError("an edited event needs text (the region's current text)")
        return self


class EventBatch(_Strict):
    events: list[Event] = Field(min_length=1, max_length=1000)


RefusalReason = Literal["not_owner", "repository_not_in_scope", "repository_mismatch", "stale"]


class Refusal(BaseModel):
    """An item that was not stored, and why (``plugins/PROTOCOL.md``, "Refusals")."""

    model_config = ConfigDict(from_attributes=True)

    completion_id: str
    choice_index: int
    reason: RefusalReason


class EventsResponse(BaseModel):
    stored: int
    duplicates: int
    unknown_completion_ids: list[str]
    refused: list[Refusal] = []


class LedgerEntryIn(_Strict):
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    repository: str = Field(min_length=1, max_length=512)
    file_path: str = Field(min_length=1, max_length=4096)
    inserted_text: str = Field(max_length=MAX_TEXT)
    current_text: str = Field(max_length=MAX_TEXT)
    start_offset: int | None = Field(None, ge=0)
    state: Literal["active", "removed"] = "active"
    updated_at: AwareDatetime


class LedgerBatch(_Strict):
    entries: list[LedgerEntryIn] = Field(min_length=1, max_length=1000)


class LedgerPutResponse(BaseModel):
    stored: int
    duplicates: int = 0  # the same update again (a retried batch)
    unknown_completion_ids: list[str]
    refused: list[Refusal] = []


class LedgerEntryOut(LedgerEntryIn):
    model_config = ConfigDict(from_attributes=True)


class LedgerList(BaseModel):
    data: list[LedgerEntryOut]
    count: int


class TestResult(_Strict):
    __test__ = False  # not a pytest test class

    name: str = Field(min_length=1, max_length=4096)
    status: TestStatus
    duration: float | None = Field(None, ge=0)
    message: str | None = Field(None, max_length=MAX_TEXT)


class CompletionOutcomeIn(_Strict):
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    file_path: str = Field(min_length=1, max_length=4096)
    final_text: str = Field(max_length=MAX_TEXT)
    status: RunStatus
    tests: list[str] = Field(default_factory=list)
    # A self-contained Python test (asserts) that judges this completion when appended to the
    # program ``prompt + text + suffix``: the trainer re-runs texts against it in its sandbox
    # and resamples the model where a context lacks a passing or a failing side.
    test_code: str | None = Field(None, max_length=MAX_TEXT)


class ExecutabilityIn(_Strict):
    """Would a completion's file run, where no test exercised it: the CI plugin's static check
    (``kaizen_client.executability``) in the project's own environment. Never a verdict."""

    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    final_text: str = Field(max_length=MAX_TEXT)
    parses: bool
    imports: bool | None = None
    api: bool | None = None
    runs: bool | None = None
    executable: bool
    problems: list[str] = Field(default_factory=list, max_length=20)


class OutcomeReport(_Strict):
    run_id: str = Field(min_length=1, max_length=256)
    repository: str = Field(min_length=1, max_length=512)
    commit: str = Field(min_length=1, max_length=64)
    branch: str | None = Field(None, max_length=256)
    status: RunStatus
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    tests: list[TestResult] = Field(default_factory=list, max_length=100_000)
    log_tail: str = Field("", max_length=MAX_LOG_TAIL)
    completions: list[CompletionOutcomeIn] = Field(default_factory=list, max_length=10_000)
    # Completions no test exercised, checked for executability in the project's environment.
    executability: list[ExecutabilityIn] = Field(default_factory=list, max_length=10_000)


class OutcomeResponse(BaseModel):
    run_id: str
    duplicate: bool
    completions: int
    unknown_completion_ids: list[str]
    refused: list[Refusal] = []


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    choice_index: int
    type: str
    timestamp: datetime
    accepted_length: int | None
    text: str | None


class OutcomeOut(BaseModel):
    run_id: str
    repository: str
    commit: str
    run_status: str
    status: str
    choice_index: int
    file_path: str
    final_text: str
    tests: list[str]
    received_at: datetime


class ChoiceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    text: str
    finish_reason: str | None
    tokens: int


class CompletionDetailOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    created_at: datetime
    endpoint: str
    model: str
    adapter: str | None
    status: str
    error: str | None
    prompt: str
    suffix: str | None
    params: dict[str, object]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    language: str | None
    file_path: str | None
    repository: str | None
    choices: list[ChoiceOut]
    events: list[EventOut] = []
    ledger: list[LedgerEntryOut] = []
    outcomes: list[OutcomeOut] = []


class AdapterStatsOut(BaseModel):
    adapter: str | None
    completions: int
    shown: int
    accepted: int
    acceptance_rate: float | None
    with_outcome: int
    passed: int
    ci_pass_rate: float | None


class StatsResponse(BaseModel):
    since: datetime
    until: datetime
    data: list[AdapterStatsOut]


# ``POST /v1/resample`` (role ci): alternatives for a served completion's context, for CI-side
# exploration (``plugins/PROTOCOL.md``, "Exploration").
MAX_RESAMPLE_N = 8
"""Alternatives one call may ask for (the server's ``KAIZEN_MAX_N`` may lower it)."""


class ResampleRequest(_Strict):
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    n: int = Field(4, ge=1, le=MAX_RESAMPLE_N)
    # None: the served request's temperature when it sampled, else 0.8 (greedy decoding would
    # give n identical alternatives).
    temperature: float | None = Field(None, gt=0.0, le=2.0)


class AlternativeOut(BaseModel):
    index: int  # the choice index to report the alternative's outcome under
    text: str
    finish_reason: str | None


class ResampleResponse(BaseModel):
    id: str  # the alternatives' completion id (``source`` resample)
    parent_id: str
    adapter: str | None  # the version that sampled them (None: the base model)
    alternatives: list[AlternativeOut]
    # How many more alternatives the server will still sample for this parent.
    remaining: int
