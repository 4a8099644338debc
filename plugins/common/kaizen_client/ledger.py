"""The ledger of accepted completions: reading, merging and locating them in a checkout.

The editor writes one JSON object per line to ``.kaizen/ledger.jsonl`` and pushes the same
entries to the server (``plugins/PROTOCOL.md``). CI merges both and looks for each active entry's
text in the checked-out files: first ``current_text``, then ``inserted_text``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "LEDGER_PATH",
    "LedgerEntry",
    "Located",
    "Warn",
    "locate",
    "merge_entries",
    "parse_entries",
    "parse_timestamp",
    "read_ledger",
]

LEDGER_PATH = PurePosixPath(".kaizen/ledger.jsonl")
"""Where the editor writes the ledger, relative to the repository root."""

Warn = Callable[[str], None]
"""Receives one human-readable warning line."""

_log = logging.getLogger("kaizen_client")
_MAX_OCCURRENCES = 10_000  # enough to pick the nearest; bounds pathological texts


def _log_warning(message: str) -> None:
    _log.warning("%s", message)


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 timestamp; ``Z`` is accepted and a naive time is taken as UTC.

    Raises ``ValueError`` when it is not a timestamp.
    """
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python < 3.11 takes only 3 or 6 fraction digits.
    text = re.sub(r"(T[\d:]+)\.(\d+)", lambda m: f"{m[1]}.{(m[2] + '000000')[:6]}", text, count=1)
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)  # noqa: UP017 (3.9)


@dataclass(frozen=True)
class LedgerEntry:
    """One accepted completion as the editor last saw it (the protocol's ledger entry)."""

    completion_id: str
    choice_index: int
    repository: str
    file_path: str
    inserted_text: str
    current_text: str
    start_offset: int | None
    state: str
    updated_at: str

    @property
    def key(self) -> tuple[str, int]:
        """``(completion_id, choice_index)``: what identifies an entry."""
        return (self.completion_id, self.choice_index)

    @property
    def updated(self) -> datetime:
        """``updated_at`` as an aware datetime."""
        return parse_timestamp(self.updated_at)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """Validate one JSON entry; unknown keys are ignored. Raises ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError("an entry must be a JSON object")

        def text(name: str, *, required: bool = True) -> str:
            value = data.get(name)
            if not isinstance(value, str) or (required and not value):
                raise ValueError(f"{name!r} must be a non-empty string")
            return value

        choice = data.get("choice_index", 0)
        if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
            raise ValueError("'choice_index' must be a non-negative integer")
        offset = data.get("start_offset")
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
        ):
            raise ValueError("'start_offset' must be a non-negative integer or null")
        state = data.get("state", "active")
        if state not in ("active", "removed"):
            raise ValueError("'state' must be 'active' or 'removed'")
        current = data.get("current_text")
        if current is None:  # tolerated: nothing edited yet
            current = text("inserted_text", required=False)
        elif not isinstance(current, str):
            raise ValueError("'current_text' must be a string")
        updated_at = text("updated_at")
        parse_timestamp(updated_at)  # raises ValueError
        return cls(
            completion_id=text("completion_id"),
            choice_index=choice,
            repository=text("repository"),
            file_path=text("file_path"),
            inserted_text=text("inserted_text", required=False),
            current_text=current,
            start_offset=offset,
            state=state,
            updated_at=updated_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as the protocol's JSON object."""
        return {
            "completion_id": self.completion_id,
            "choice_index": self.choice_index,
            "repository": self.repository,
            "file_path": self.file_path,
            "inserted_text": self.inserted_text,
            "current_text": self.current_text,
            "start_offset": self.start_offset,
            "state": self.state,
            "updated_at": self.updated_at,
        }


def parse_entries(
    items: Iterable[Any], *, source: str, warn: Warn | None = None
) -> list[LedgerEntry]:
    """Validate decoded JSON entries, skipping invalid ones with one warning for them all."""
    entries: list[LedgerEntry] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        try:
            entries.append(LedgerEntry.from_dict(item))
        except ValueError as exc:
            problems.append(f"entry {index + 1}: {exc}")
    if problems:
        (warn or _log_warning)(
            f"kaizen: skipped {len(problems)} malformed ledger "
            f"entr{'y' if len(problems) == 1 else 'ies'} from {source} ({problems[0]})"
        )
    return entries


def read_ledger(path: Path, *, warn: Warn | None = None) -> list[LedgerEntry]:
    """Read a ``ledger.jsonl``: the last line of each ``(completion_id, choice_index)`` wins.

    A missing file is an empty ledger. Malformed lines (bad JSON, bad UTF-8, missing or
    wrongly typed fields) are skipped with one warning naming how many and the first.
    """
    warn = warn or _log_warning
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        warn(f"kaizen: could not read the ledger {path}: {exc}")
        return []
    latest: dict[tuple[str, int], LedgerEntry] = {}
    problems: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = LedgerEntry.from_dict(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            problems.append(f"line {number}: {exc}")
            continue
        latest.pop(entry.key, None)  # keep the order of last appearance
        latest[entry.key] = entry
    if problems:
        warn(
            f"kaizen: skipped {len(problems)} malformed line{'s' * (len(problems) != 1)} "
            f"in {path} ({problems[0]})"
        )
    return list(latest.values())


def merge_entries(*sources: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """Merge ledgers by ``(completion_id, choice_index)``; the newer ``updated_at`` wins.

    On equal timestamps the entry from the earlier source wins, so pass the checkout's own
    ledger first and the server's second.
    """
    merged: dict[tuple[str, int], LedgerEntry] = {}
    for source in sources:
        for entry in source:
            known = merged.get(entry.key)
            if known is None or entry.updated > known.updated:
                merged[entry.key] = entry
    return list(merged.values())


@dataclass(frozen=True)
class Located:
    """An active ledger entry whose text was found in the working tree."""

    entry: LedgerEntry
    path: Path
    """The file, absolute and resolved."""
    final_text: str
    """The region's text as found (the ledger's text it matched)."""
    matched: str
    """Which of the entry's texts was found: ``"current_text"`` or ``"inserted_text"``."""
    offset: int
    """Character offset of the match in the file."""
    start_line: int
    """First line of the match, 1-based."""
    end_line: int
    """Last line of the match, 1-based, inclusive."""

    @property
    def key(self) -> tuple[str, int]:
        """The entry's ``(completion_id, choice_index)``."""
        return self.entry.key

    @property
    def lines(self) -> range:
        """The line numbers the match spans."""
        return range(self.start_line, self.end_line + 1)


def _variants(text: str) -> list[str]:
    """The text, then the same text with the other line-ending convention."""
    out = [text]
    if "\r\n" in text:
        out.append(text.replace("\r\n", "\n"))
    elif "\n" in text:
        out.append(text.replace("\n", "\r\n"))
    return out


def _find_near(content: str, text: str, near: int | None) -> int | None:
    """Offset of ``text`` in ``content``, the occurrence nearest ``near`` when there are several."""
    first = content.find(text)
    if first < 0 or near is None:
        return None if first < 0 else first
    best, best_distance = first, abs(first - near)
    position, seen = first, 1
    while seen < _MAX_OCCURRENCES:
        position = content.find(text, position + 1)
        if position < 0:
            break
        seen += 1
        distance = abs(position - near)
        if distance < best_distance:
            best, best_distance = position, distance
        elif position > near:
            break  # occurrences only get further away from here on
    return best


def _line_span(content: str, offset: int, length: int) -> tuple[int, int]:
    start = content.count("\n", 0, offset) + 1
    region = content[offset : offset + length]
    # A region ending with its newline does not reach into the next line.
    newlines = region.count("\n") - (1 if region.endswith("\n") and len(region) > 1 else 0)
    return start, start + max(newlines, 0)


def _safe_relative(file_path: str) -> PurePosixPath | None:
    relative = PurePosixPath(file_path.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        return None
    if relative.parts[0].endswith(":"):  # a Windows drive
        return None
    return relative


def locate(
    entries: Iterable[LedgerEntry], root: Path, *, warn: Warn | None = None
) -> list[Located]:
    """Find each active entry's text in the working tree at ``root``.

    ``current_text`` is tried first, then ``inserted_text``; a text that occurs several times is
    taken at the occurrence nearest ``start_offset``. Removed entries, entries whose file is
    missing or unreadable, paths outside ``root`` and blank texts are left out (not covered).
    Line endings may differ between the ledger and the file (``\\n`` vs ``\\r\\n``).
    """
    root = Path(root).resolve()
    contents: dict[PurePosixPath, str | None] = {}
    located: list[Located] = []
    unsafe: list[str] = []
    for entry in entries:
        if entry.state != "active":
            continue
        relative = _safe_relative(entry.file_path)
        if relative is None:
            unsafe.append(entry.file_path)
            continue
        if relative not in contents:
            try:
                contents[relative] = (root / relative).read_bytes().decode("utf-8", "replace")
            except OSError:
                contents[relative] = None
        content = contents[relative]
        if content is None:
            continue
        found = _match(entry, content)
        if found is None:
            continue
        matched, text, offset, length = found
        start_line, end_line = _line_span(content, offset, length)
        located.append(
            Located(
                entry=entry,
                path=(root / relative).resolve(),
                final_text=text,
                matched=matched,
                offset=offset,
                start_line=start_line,
                end_line=end_line,
            )
        )
    if unsafe:
        (warn or _log_warning)(
            f"kaizen: ignored {len(unsafe)} ledger entr{'y' if len(unsafe) == 1 else 'ies'} "
            f"with a path outside the repository ({unsafe[0]!r})"
        )
    return located


def _match(entry: LedgerEntry, content: str) -> tuple[str, str, int, int] | None:
    """``(which text, the text, offset, length in the file)`` of the entry's best match."""
    for name in ("current_text", "inserted_text"):
        text: str = getattr(entry, name)
        if not text.strip():
            continue
        for variant in _variants(text):
            offset = _find_near(content, variant, entry.start_offset)
            if offset is not None:
                return name, text, offset, len(variant)
    return None
