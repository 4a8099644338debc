"""Routing in a replica: pinned first, then the canary's sticky share, then the active version."""

from __future__ import annotations

from server.services.routing import Router, Routing, in_canary
from server.store.tokens import Principal, Role


def principal(token_id: int) -> Principal:
    return Principal(token_id=token_id, name=f"dev{token_id}", role=Role.IDE)


def test_the_pinned_version_serves_everybody() -> None:
    router = Router(Routing(active="v1", canary="v2", pinned="v0", canary_share=1.0))
    assert {router.route(principal(i)) for i in range(50)} == {"v0"}


def test_the_canary_takes_its_share_of_tokens_and_the_rest_go_to_the_active_one() -> None:
    router = Router(Routing(active="v1", canary="v2", canary_share=0.3))
    served = [router.route(principal(i)) for i in range(2000)]
    share = served.count("v2") / len(served)
    assert 0.25 < share < 0.35 and set(served) == {"v1", "v2"}
    # Sticky: the same token lands on the same side every time.
    assert [router.route(principal(i)) for i in range(2000)] == served
    assert all((s == "v2") == in_canary(i, 0.3) for i, s in enumerate(served))


def test_no_version_means_the_base_model() -> None:
    assert Router().route(principal(1)) is None
    assert Router(Routing(canary="v2", canary_share=0.0)).route(principal(1)) is None


def test_in_flight_counts_hold_a_version_until_the_last_request_ends() -> None:
    router = Router()
    router.acquire("v1")
    router.acquire("v1")
    router.acquire(None)  # the base model is never unloaded: not counted
    router.release("v1")
    assert router.in_flight == {"v1": 1}
    router.release("v1")
    assert router.in_flight == {}
    assert router.describe()["in_flight"] == {}
