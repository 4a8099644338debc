"""Request and response models of Tabby's API, as its agent (tabby-agent) speaks it.

Read from TabbyML/tabby: ``crates/tabby/src/services/completion.rs`` (the completion request),
``crates/tabby-common/src/api/event.rs`` (events), ``crates/tabby/src/services/health.rs`` and
``clients/tabby-agent/src/http/tabbyApiClient.ts`` (what the agent reads of each). Unknown
fields are ignored, as Tabby's server ignores them: a newer agent must keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 200_000  # characters of one snippet, prefix or suffix


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TabbyDeclaration(_Lenient):
    """A declaration of a symbol used near the cursor, found by the editor's language server."""

    filepath: str = Field(max_length=4096)
    body: str = Field(max_length=MAX_TEXT)


class TabbySnippet(TabbyDeclaration):
    """Code from a recently changed or opened file; sorted by ``score``, best first."""

    score: float | None = None


class TabbySegments(_Lenient):
    prefix: str = Field(max_length=MAX_TEXT)
    suffix: str | None = Field(None, max_length=MAX_TEXT)
    # Relative to the git root when git_url is set, else to the workspace.
    filepath: str | None = Field(None, max_length=4096)
    git_url: str | None = Field(None, max_length=4096)
    declarations: list[TabbyDeclaration] | None = Field(None, max_length=100)
    relevant_snippets_from_changed_files: list[TabbySnippet] | None = Field(None, max_length=100)
    relevant_snippets_from_recently_opened_files: list[TabbySnippet] | None = Field(
        None, max_length=100
    )
    # Not sent to the model: a clipboard may hold anything (a password, a token).
    clipboard: str | None = None


class TabbyCompletionRequest(_Lenient):
    language: str | None = Field(None, max_length=64)
    segments: TabbySegments
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    mode: str = "standard"
    user: str | None = None


class TabbyChoice(BaseModel):
    index: int
    text: str


class TabbyCompletionResponse(BaseModel):
    id: str
    choices: list[TabbyChoice]
    mode: str = "standard"


class TabbyEvent(_Lenient):
    """One ``POST /v1/events`` of the agent: what the user did with a shown completion."""

    type: Literal["view", "select", "dismiss"]
    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(0, ge=0)
    view_id: str | None = None
    elapsed: int | None = Field(None, ge=0)  # milliseconds the completion was shown
    select_kind: Literal["line"] | None = None  # the agent also sends it as a query parameter


class TabbyVersion(BaseModel):
    build_date: str
    build_timestamp: str
    git_sha: str
    # The agent fetches /v1beta/server_setting only from servers whose version coerces to
    # 0.9.0 or later; Kaizen reports its own version, so the agent skips that request.
    git_describe: str


class TabbyLocalModel(BaseModel):
    model_id: str
    device: str


class TabbyModels(BaseModel):
    completion: dict[str, TabbyLocalModel]


class TabbyHealth(BaseModel):
    """What ``GET /v1/health`` answers. The agent enables completion when ``model`` is set and
    chat when ``chat_model`` is (absent here: Tabby's chat protocol is not served)."""

    model: str
    device: str
    cuda_devices: list[str] = []
    models: TabbyModels
    arch: str
    cpu_info: str
    cpu_count: int
    version: TabbyVersion
    webserver: bool | None = None


class TabbyServerSetting(BaseModel):
    # Kaizen is on-prem: ask the agent not to send anonymous usage statistics to TabbyML.
    disable_client_side_telemetry: bool = True
