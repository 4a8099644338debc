"""Repository ids: PROTOCOL.md's normalisation cases and the fallbacks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kaizen_client.repository import find_root, normalise_remote, repository_id

# PROTOCOL.md, "Identifiers": the cases every client implementation is tested against.
PROTOCOL_CASES = [
    ("git@github.com:Acme/App.git", "github.com/acme/app"),
    ("https://github.com/acme/app", "github.com/acme/app"),
    ("https://user:tok@GitLab.example.com/group/sub/proj.git", "gitlab.example.com/group/sub/proj"),
    ("ssh://git@host:2222/x/y", "host/x/y"),
    ("https://github.com/acme/app/", "github.com/acme/app"),
]

MORE_CASES = [
    ("http://github.com/Acme/App.git/", "github.com/acme/app"),
    ("https://github.com:443/acme/app", "github.com/acme/app"),
    ("git://git.example.org/pub/tool.git", "git.example.org/pub/tool"),
    ("github.com:acme/app.git", "github.com/acme/app"),
    ("  git@github.com:acme/app.git\n", "github.com/acme/app"),
    ("ssh://git@github.com/acme//app.git", "github.com/acme/app"),
    ("file:///srv/git/App.git", "srv/git/app"),
    ("/srv/git/app.git", "srv/git/app"),
]


@pytest.mark.parametrize(("url", "expected"), PROTOCOL_CASES)
def test_protocol_cases(url: str, expected: str) -> None:
    assert normalise_remote(url) == expected


@pytest.mark.parametrize(("url", "expected"), MORE_CASES)
def test_more_remote_forms(url: str, expected: str) -> None:
    assert normalise_remote(url) == expected


def test_empty_url_is_refused() -> None:
    with pytest.raises(ValueError):
        normalise_remote("  ")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_repository_id_from_origin(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "remote", "add", "origin", "git@github.com:Acme/App.git")
    (tmp_path / "pkg").mkdir()
    assert repository_id(tmp_path) == "github.com/acme/app"
    assert find_root(tmp_path / "pkg") == tmp_path.resolve()


def test_repository_id_without_remote_or_git(tmp_path: Path) -> None:
    plain = tmp_path / "My-Project"
    plain.mkdir()
    assert repository_id(plain) == "local/My-Project"
    assert find_root(plain) == plain.resolve()
    _git(plain, "init", "-q")  # a repository without origin
    assert repository_id(plain) == "local/My-Project"
