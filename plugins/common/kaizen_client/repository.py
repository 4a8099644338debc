"""Repository identity (``plugins/PROTOCOL.md``, "Identifiers") and small git helpers.

A repository is named by the normalised URL of its ``origin`` remote: host and path, lower-case,
no scheme, no user, no port, no ``.git``. Without a remote it is ``local/<directory name>``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["find_root", "git", "normalise_remote", "repository_id"]

# scp-like syntax: [user@]host:path (git's rule: no slash before the first colon).
_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>.*)$")


def normalise_remote(url: str) -> str:
    """Normalise a git remote URL to ``host/path`` as the protocol defines it.

    >>> normalise_remote("git@github.com:Acme/App.git")
    'github.com/acme/app'
    >>> normalise_remote("https://user:tok@GitLab.example.com/group/sub/proj.git")
    'gitlab.example.com/group/sub/proj'
    >>> normalise_remote("ssh://git@host:2222/x/y")
    'host/x/y'
    >>> normalise_remote("https://github.com/acme/app/")
    'github.com/acme/app'

    Local remotes (``/srv/git/app.git``, ``file:///srv/git/app.git``) become their path
    without the leading slash (``srv/git/app``). Raises ``ValueError`` for an empty URL.
    """
    text = url.strip()
    if not text:
        raise ValueError("empty remote URL")
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
            host, path = "", text  # a local path
    path = path.replace("\\", "/")
    path = re.sub(r"/{2,}", "/", path).strip("/")
    if path.lower().endswith(".git"):
        path = path[: -len(".git")].rstrip("/")
    joined = f"{host}/{path}" if host and path else host or path
    return joined.lower()


def git(root: Path, *args: str, timeout: float = 10.0) -> str | None:
    """Run ``git -C root args...`` and return its stripped stdout, or ``None`` on any failure."""
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    out = result.stdout.strip()
    return out or None


def find_root(start: Path) -> Path:
    """The git work tree's top directory containing ``start``, or ``start`` itself outside git.

    Ledger paths are relative to this directory.
    """
    top = git(start, "rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path(start).resolve()


def repository_id(root: Path) -> str:
    """The protocol's repository id for the checkout at ``root``.

    The normalised URL of ``git remote get-url origin``; without git or without an ``origin``
    remote, ``local/<name of root>``.
    """
    url = git(root, "remote", "get-url", "origin")
    if url:
        try:
            normalised = normalise_remote(url)
        except ValueError:
            normalised = ""
        if normalised:
            return normalised
    return f"local/{Path(root).resolve().name}"
