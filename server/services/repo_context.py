"""Fit a repository-level FIM prompt into the context: other files first, then the prefix.

An editor (Tabby's agent) sends the text around the cursor plus declarations and snippets from
other files, without knowing this model's context length. Refusing such a request with a 400
would leave the editor without completions, so the prompt is trimmed instead, dropping what the
completion needs least first: the lowest-ranked snippets (the last ones sent), then the start of
the prefix (far from the cursor), then the end of the suffix. What is left is exactly what the
model sees and what is recorded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from server.engine.fim import FimFormat, RepoFile, repo_context

# Tokenise a text (in a worker thread: the caller decides) and return its ids.
TokenCounter = Callable[[str], Awaitable[list[int]]]


@dataclass(frozen=True)
class RepoPrompt:
    """The repository context of a FIM request: other files, most relevant first."""

    name: str
    files: tuple[RepoFile, ...] = ()
    file_path: str | None = None


@dataclass(frozen=True)
class FittedPrompt:
    prefix: str
    suffix: str
    context: str  # the FIM context actually used (empty: no other file fitted, or none sent)
    text: str  # the model's prompt
    token_ids: list[int]
    files_sent: int
    files_kept: int


class PromptDoesNotFitError(ValueError):
    """Even the prompt cut to its last line does not fit (a tiny context, a huge line)."""


def _drop_head(text: str, chars: int) -> str:
    """``text`` without its first ``chars`` characters, cut on to the next line start so the
    model never sees half a line at the top (unless only the cursor's line is left)."""
    rest = text[chars:]
    newline = rest.find("\n")
    return rest[newline + 1 :] if 0 <= newline < len(rest) - 1 else rest


def _drop_tail(text: str, chars: int) -> str:
    rest = text[: max(len(text) - chars, 0)]
    newline = rest.rfind("\n")
    return rest[: newline + 1] if newline > 0 else rest


async def fit_prompt(
    *,
    fim: FimFormat,
    prefix: str,
    suffix: str,
    repo_name: str,
    files: Sequence[RepoFile],
    file_path: str | None,
    max_tokens: int,
    max_chars: int,
    count: TokenCounter,
) -> FittedPrompt:
    """The largest prompt of at most ``max_tokens`` tokens (and ``max_chars`` characters, checked
    first, so a huge request is cut without tokenising all of it)."""
    kept = list(files)

    def build() -> str:
        return fim.build(prefix, suffix, repo_context(repo_name, kept, file_path))

    def cut(chars: int) -> bool:
        """Cut about ``chars`` characters: the prefix's lines far from the cursor, then the end
        of the suffix, then the cursor's own line from its start. False: nothing left."""
        nonlocal prefix, suffix
        line_start = prefix.rfind("\n") + 1
        if line_start > 0:
            prefix = _drop_head(prefix, min(chars, line_start))
        elif suffix.strip():
            suffix = _drop_tail(suffix, chars)
        elif len(prefix) > 1:
            prefix = prefix[min(chars, len(prefix) - 1) :]
        else:
            return False
        return True

    text = build()
    while len(text) > max_chars and kept:
        kept.pop()
        text = build()
    while len(text) > max_chars and cut(len(text) - max_chars):
        text = build()
    # Each round either drops a file or cuts by an estimate from the measured characters per
    # token (cuts end on whole lines, so a round cuts a little more than the estimate).
    for _ in range(len(kept) + 16):
        ids = await count(text)
        if len(ids) <= max_tokens:
            return FittedPrompt(
                prefix=prefix,
                suffix=suffix,
                context=repo_context(repo_name, kept, file_path),
                text=text,
                token_ids=ids,
                files_sent=len(files),
                files_kept=len(kept),
            )
        if kept:
            kept.pop()
        else:
            excess = len(ids) - max_tokens
            if not cut(int(excess * len(text) / max(len(ids), 1)) + 1):
                break
        text = build()
    raise PromptDoesNotFitError(
        f"The text around the cursor does not fit this model's context of {max_tokens} "
        "prompt tokens even after dropping the other files and the start of the prefix."
    )
