"""The poisoning simulation (benchmarks/poison.py) through the real app with the fake engine:
a CI token scoped to X gets no pair out of Y's completions and at most the cap out of X's."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from benchmarks.poison import REPO_X, REPO_Y, body, run_poisoning
from tests.utils.fake_engine import FakeEngine


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(reply=lambda prompt, adapter, index: body(prompt), max_model_len=512)


def test_a_scoped_token_cannot_poison_another_repository_and_is_capped_in_its_own(
    client: TestClient, session_factory
) -> None:  # type: ignore[no-untyped-def]
    result = run_poisoning(client, session_factory, tasks=6, max_token_share=0.5)
    attacks = result["attack_requests"]
    # Every report on Y's completions was refused by the API; nothing was stored for them.
    assert attacks[f"{REPO_Y}:refused"] == 24 and attacks[f"{REPO_Y}:stored"] == 0
    assert attacks[f"{REPO_X}:stored"] == 24
    assert REPO_Y not in result["attacker_records"]
    assert result["attacker_pairs_y"] == 0
    assert 0 < result["attacker_pairs_x"] <= result["cap"]
    funnel = result["funnel"]
    attacker = str(result["token_ids"]["attacker"])
    assert funnel["token_shares"][attacker] <= 0.5 < funnel["token_shares_before_cap"][attacker]
    assert funnel["dropped"]["fix_too_far"] > 0  # the far "fixes" never pair as fixes
    assert result["pairs"][REPO_Y]["pairs"] > 0  # Y's honest pairs are untouched
