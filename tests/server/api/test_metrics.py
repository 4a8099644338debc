"""``GET /metrics`` through the real app (fake engine): who may read it, and that completions,
IDE events and CI verdicts are counted per adapter version as they are stored."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.server.api.test_feedback import _complete, _event, _outcome
from tests.utils.records import flush


def samples(client: TestClient, headers: dict[str, str]) -> dict[str, list[tuple[dict, float]]]:  # type: ignore[type-arg]
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict, float]]] = {}  # type: ignore[type-arg]
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    matching = [v for lab, v in found.get(name, []) if labels.items() <= lab.items()]
    assert matching, f"no {name} with {labels}: {found.get(name)}"
    return sum(matching)


def test_metrics_need_a_metrics_or_ops_token(client: TestClient, auth) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/metrics").status_code == 401
    for role in ("ide", "ci"):
        response = client.get("/metrics", headers=auth[role])
        assert response.status_code == 403, role
        assert response.json()["error"]["code"] == "wrong_role"
    assert client.get("/metrics", headers=auth["metrics"]).status_code == 200
    assert client.get("/metrics", headers=auth["ops"]).status_code == 200
    # A metrics token reads metrics and nothing else.
    denied = client.get("/v1/stats", headers=auth["metrics"])
    assert denied.status_code == 403


def test_completions_events_and_verdicts_are_counted_per_version(client: TestClient, auth) -> None:  # type: ignore[no-untyped-def]
    before = samples(client, auth["metrics"])
    assert "kaizen_completions_total" not in before  # nothing served yet
    assert value(before, "kaizen_loop_database_up") == 1
    assert value(before, "kaizen_registry_synced", model="fake-model") in (0, 1)

    first, second = _complete(client, auth), _complete(client, auth)
    flush(client)
    events = [_event(first, "shown"), _event(second, "shown"), _event(first, "accepted")]
    assert (
        client.post("/v1/events", headers=auth["ide"], json={"events": events}).status_code == 200
    )
    # The same batch again stores nothing and counts nothing.
    client.post("/v1/events", headers=auth["ide"], json={"events": events})
    report = _outcome("run-1", first, "passed", "return a + b")
    assert client.post("/v1/outcomes", headers=auth["ci"], json=report).status_code == 200
    client.post("/v1/outcomes", headers=auth["ci"], json=report)  # a duplicate

    found = samples(client, auth["metrics"])
    base = {"adapter": "base", "model": "fake-model"}
    assert value(found, "kaizen_completions_total", **base, route="base", status="completed") == 2
    assert value(found, "kaizen_completion_latency_seconds_count", **base, route="base") == 2
    assert value(found, "kaizen_time_to_first_token_seconds_count", **base) == 2
    assert value(found, "kaizen_prompt_tokens_total", **base) > 0
    assert value(found, "kaizen_generated_tokens_total", **base) > 0
    assert value(found, "kaizen_ide_events_total", **base, type="shown") == 2
    assert value(found, "kaizen_ide_events_total", **base, type="accepted") == 1
    assert value(found, "kaizen_ci_outcomes_total", **base, status="passed") == 1
    assert value(found, "kaizen_canary_share") == 0
    assert value(found, "kaizen_gate_decisions_total", decision="approved") == 0
    # Process metrics of the global registry come along (vLLM's join them on a real engine).
    assert "process_cpu_seconds_total" in found or "python_info" in found
