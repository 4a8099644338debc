"""Repository ids on the server: one normaliser for tokens' scopes and served records.

The server cannot import ``plugins/``, so this mirrors ``normalise_remote`` of
``plugins/common/kaizen_client/repository.py`` (and ``plugins/vscode/src/repository.ts``);
``tests/server/store/test_repositories.py`` holds them to the same answers. An id the clients
already normalised comes back unchanged, so comparing normalised forms is always safe.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

# scp-like syntax: [user@]host:path (git's rule: no slash before the first colon).
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>.*)$")
LOCAL_PREFIX = "local/"


def normalise_repository(value: str) -> str:
    """``host/path`` of a remote URL or repository id, as ``plugins/PROTOCOL.md`` defines it.

    ``git@github.com:Acme/App.git``, ``https://github.com/acme/app/`` and ``github.com/acme/app``
    all give ``github.com/acme/app``. A ``local/<directory>`` id (a checkout without ``origin``)
    keeps its case, as the clients keep it. Raises ``ValueError`` for an empty value.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty repository")
    if text.startswith(LOCAL_PREFIX):
        return text
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname or ""  # drops user, password and port; lower-cases
        path = unquote(parts.path)
    else:
        match = _SCP_LIKE.match(text)
        # "C:\\src\\app" is a Windows path, not host "C".
        if match and len(match.group("host")) > 1 and not text.startswith((".", "/")):
            host, path = match.group("host"), match.group("path")
        else:
            host, path = "", text  # an id already normalised, or a local path
    path = path.replace("\\", "/")
    path = re.sub(r"/{2,}", "/", path).strip("/")
    if path.lower().endswith(".git"):
        path = path[: -len(".git")].rstrip("/")
    joined = f"{host}/{path}" if host and path else host or path
    if not joined:
        raise ValueError(f"{value!r} names no repository")
    return joined.lower()


def normalised_or_none(value: str | None) -> str | None:
    """``normalise_repository(value)``, or ``None`` for a missing or empty value (a served
    record whose client sent no repository)."""
    if value is None:
        return None
    try:
        return normalise_repository(value)
    except ValueError:
        return None
