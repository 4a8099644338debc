"""The server's repository normaliser gives the CI client's answers on the same inputs (the
server cannot import ``plugins/``, so the two are kept in step by this test)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kaizen_client.repository import normalise_remote, repository_id

from server.store.repositories import normalise_repository, normalised_or_none
from tests.plugins.test_repository import MORE_CASES, PROTOCOL_CASES

INPUTS = [url for url, _ in PROTOCOL_CASES + MORE_CASES] + [
    "GitHub.com/Acme/App",  # an id typed by hand
    "gitlab.example.com:group/sub/proj",
    "https://[::1]:8080/x/y.git",
]


@pytest.mark.parametrize("value", INPUTS)
def test_same_answer_as_the_ci_client(value: str) -> None:
    assert normalise_repository(value) == normalise_remote(value)


@pytest.mark.parametrize(("url", "expected"), PROTOCOL_CASES)
def test_normalised_ids_come_back_unchanged(url: str, expected: str) -> None:
    assert normalise_repository(expected) == expected
    assert normalise_repository(normalise_repository(url)) == expected


def test_local_ids_keep_their_case_like_the_clients(tmp_path: Path) -> None:
    checkout = tmp_path / "My-Project"
    checkout.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    local = repository_id(checkout)
    assert local == "local/My-Project"
    assert normalise_repository(local) == local


@pytest.mark.parametrize("value", ["", "   ", "/", "https://"])
def test_values_naming_no_repository_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        normalise_repository(value)
    assert normalised_or_none(value) is None
    assert normalised_or_none(None) is None
