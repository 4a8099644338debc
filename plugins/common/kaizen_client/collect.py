"""What every CI client does first: find the checkout, load and merge the ledgers, locate the
completions. Shared by the pytest plugin and ``kaizen-report``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kaizen_client.client import KaizenClient, KaizenError
from kaizen_client.ledger import LEDGER_PATH, Located, Warn, locate, merge_entries, read_ledger
from kaizen_client.repository import find_root, repository_id

__all__ = ["Completions", "Settings", "collect_completions", "settings_from"]

LEDGER_TIMEOUT = 2.0
"""Seconds the server gets to answer ``GET /v1/ledger``."""


@dataclass(frozen=True)
class Settings:
    """Where to report, from options or the environment."""

    url: str | None
    token: str | None

    @property
    def enabled(self) -> bool:
        """Reporting is on when a server URL is configured."""
        return bool(self.url)


def settings_from(
    url: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Options win over ``$KAIZEN_URL`` and ``$KAIZEN_TOKEN``; blank values count as unset."""
    env = os.environ if environ is None else environ
    chosen_url = (url or env.get("KAIZEN_URL") or "").strip() or None
    chosen_token = (token or env.get("KAIZEN_TOKEN") or "").strip() or None
    return Settings(url=chosen_url, token=chosen_token)


@dataclass
class Completions:
    """The checkout and the completions found in it."""

    root: Path
    repository: str
    located: list[Located] = field(default_factory=list)
    local_entries: int = 0
    server_entries: int = 0
    ledger_error: str | None = None
    """Why the server's ledger could not be fetched (the local ledger was used alone)."""


def collect_completions(
    start: Path,
    client: KaizenClient | None,
    *,
    timeout: float = LEDGER_TIMEOUT,
    warn: Warn | None = None,
) -> Completions:
    """Find the repository containing ``start``, merge its ``.kaizen/ledger.jsonl`` (and
    ``start``'s, when ``start`` is a sub-folder; paths are relative to the repository) with the
    server's ledger (when ``client`` is given; a failure is recorded in ``ledger_error``, not
    raised) and locate the active entries in the working tree."""
    root = find_root(start)
    result = Completions(root=root, repository=repository_id(root))
    local = read_ledger(root / LEDGER_PATH, warn=warn)
    workspace = Path(start).resolve()
    if workspace != root:  # an editor opened on a sub-folder keeps its ledger there
        local = merge_entries(local, read_ledger(workspace / LEDGER_PATH, warn=warn))
    remote = []
    if client is not None:
        try:
            remote = client.fetch_ledger(result.repository, timeout=timeout, warn=warn)
        except KaizenError as exc:
            result.ledger_error = str(exc)
    result.local_entries, result.server_entries = len(local), len(remote)
    result.located = locate(merge_entries(local, remote), root, warn=warn)
    return result
