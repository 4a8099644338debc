"""Prometheus metrics of one replica, per adapter version: what ``GET /metrics`` shows.

Every series of a request carries the labels ``adapter`` (the version that served it, ``base``
for the base model), ``model`` (the base model's name) and, for completions, ``route``: how the
request got that version (``active``, ``canary``, ``pinned``; ``named`` when the client asked
for an adapter by name; ``base`` when nothing is routed). The route is read when the request
starts, so a swap during a request does not relabel it.

Three kinds of figures:

* counted here as requests finish and feedback is stored (:class:`Metrics`): completions by
  status, time to first token and end-to-end latency, prompt and generated tokens, IDE events
  by type, CI verdicts by status;
* read at scrape time from this replica's routing (:class:`_RoutingCollector`): which version
  is active, canary or pinned, the canary's share, requests in flight per version;
* read at scrape time from the database (:class:`_LoopCollector`): rounds by status and their
  duration, gate decisions, the registry's live versions by state. These are the same on every
  replica.

vLLM's own engine metrics (``vllm:*``, labelled by ``model_name``; vLLM does not label them
per adapter) live in ``prometheus_client``'s global registry, where vLLM puts them; the
exposition joins both (:meth:`Metrics.exposition`).

One process serves one replica (vLLM runs in the server process), so there is no
multiprocess mode to set up: scrape every replica (one target each) and aggregate in
Prometheus, e.g. ``sum by (adapter) (rate(kaizen_completions_total[5m]))``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from server.services.routing import Router, Routing
from server.store.completions import CompletionRecord
from server.store.loop_metrics import loop_counts

__all__ = ["BASE", "Metrics", "route_label"]

log = logging.getLogger(__name__)

BASE = "base"  # the adapter label of requests the base model served

# Seconds. Completions on a CPU take seconds, on a GPU tens of milliseconds.
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


def route_label(routing: Routing | None, adapter: str | None) -> str:
    """How a request came to run on ``adapter`` under ``routing``."""
    if adapter is None:
        return BASE
    if routing is not None:
        if adapter == routing.pinned:
            return "pinned"
        if adapter == routing.canary:
            return "canary"
        if adapter == routing.active:
            return "active"
    return "named"


class Metrics:
    """The replica's metrics; the services call the ``observe``/``count`` methods."""

    def __init__(
        self,
        *,
        model: str,
        router: Router | None = None,
        session_factory: sessionmaker[Session] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model = model
        self.router = router
        # Our own registry (not the global one): an app built twice in one process (tests)
        # gets fresh series instead of a duplicate-registration error.
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        per_request = ["adapter", "model", "route"]
        self.completions = Counter(
            "kaizen_completions",
            "Completions by how they ended (completed, aborted, failed).",
            [*per_request, "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "kaizen_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            per_request,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "kaizen_completion_latency_seconds",
            "From the request's arrival to its last token (end to end).",
            per_request,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kaizen_prompt_tokens", "Prompt tokens of completions.", per_request, registry=r
        )
        self.generated_tokens = Counter(
            "kaizen_generated_tokens",
            "Tokens generated, all choices together.",
            per_request,
            registry=r,
        )
        self.ide_events = Counter(
            "kaizen_ide_events",
            "IDE events stored (shown, accepted, rejected, ...), by the version that served "
            "the completion.",
            ["adapter", "model", "type"],
            registry=r,
        )
        self.ci_outcomes = Counter(
            "kaizen_ci_outcomes",
            "CI verdicts stored on completions (passed, failed, ...), by the version that "
            "served the completion.",
            ["adapter", "model", "status"],
            registry=r,
        )
        if router is not None:
            r.register(_RoutingCollector(router, model))
        if session_factory is not None:
            r.register(_LoopCollector(session_factory, model))

    def observe_completion(self, record: CompletionRecord, route: str) -> None:
        """Count a finished completion (any status) under the route it started on."""
        labels = {"adapter": record.adapter or BASE, "model": self.model, "route": route}
        self.completions.labels(**labels, status=record.status).inc()
        if record.ttft_ms is not None:
            self.ttft.labels(**labels).observe(record.ttft_ms / 1000)
        self.latency.labels(**labels).observe(record.latency_ms / 1000)
        self.prompt_tokens.labels(**labels).inc(record.prompt_tokens)
        self.generated_tokens.labels(**labels).inc(sum(c.tokens for c in record.choices))

    def count_events(self, stored: Mapping[tuple[str, str | None], int]) -> None:
        """Count stored IDE events, keyed (event type, serving adapter)."""
        for (kind, adapter), n in stored.items():
            self.ide_events.labels(adapter=adapter or BASE, model=self.model, type=kind).inc(n)

    def count_outcomes(self, stored: Mapping[tuple[str, str | None], int]) -> None:
        """Count stored CI verdicts, keyed (status, serving adapter)."""
        for (status, adapter), n in stored.items():
            labels = {"adapter": adapter or BASE, "model": self.model, "status": status}
            self.ci_outcomes.labels(**labels).inc(n)

    def exposition(self) -> bytes:
        """The text format: Kaizen's series, then vLLM's and the process's (the global
        registry). Reads the database: call it off the event loop."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _RoutingCollector(Collector):
    """This replica's routing table, read at scrape time."""

    def __init__(self, router: Router, model: str) -> None:
        self.router, self.model = router, model

    def collect(self) -> Iterator[Metric]:
        routing = self.router.routing
        routes = GaugeMetricFamily(
            "kaizen_route_info",
            "1 for each version this replica routes to, by route (active, canary, pinned).",
            labels=["adapter", "model", "route"],
        )
        for route in ("active", "canary", "pinned"):
            name = getattr(routing, route)
            if name is not None:
                routes.add_metric([name, self.model, route], 1)
        yield routes
        share = GaugeMetricFamily(
            "kaizen_canary_share",
            "Share of tokens routed to the canary (0 when there is none).",
            labels=["adapter", "model"],
        )
        share.add_metric(
            [routing.canary or "", self.model],
            routing.canary_share if routing.canary is not None else 0.0,
        )
        yield share
        in_flight = GaugeMetricFamily(
            "kaizen_requests_in_flight",
            "Requests generating now, by version.",
            labels=["adapter", "model"],
        )
        for name, n in sorted(self.router.in_flight.items()):
            in_flight.add_metric([name, self.model], n)
        yield in_flight
        synced = GaugeMetricFamily(
            "kaizen_registry_synced",
            "1 once this replica has read the registry and loaded its versions.",
            labels=["model"],
        )
        synced.add_metric([self.model], 1.0 if self.router.synced else 0.0)
        yield synced


class _LoopCollector(Collector):
    """The learning loop's counts from the database, read at scrape time. When the database
    is down the scrape still answers: ``kaizen_loop_database_up`` is 0 and these are absent."""

    def __init__(self, session_factory: sessionmaker[Session], model: str) -> None:
        self.session_factory, self.model = session_factory, model

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "kaizen_loop_database_up",
            "1 when this scrape could read the loop's counts from the database.",
        )
        try:
            with self.session_factory() as session:
                counts = loop_counts(session=session)
        except Exception as exc:  # the database is down: say so, serve the rest
            log.warning("event=metrics_database_unavailable error=%r", str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        rounds = CounterMetricFamily(
            "kaizen_training_rounds", "Training rounds by status.", labels=["status"]
        )
        durations = SummaryMetricFamily(
            "kaizen_training_round_duration_seconds",
            "Wall time of finished training rounds, by status.",
            labels=["status"],
        )
        for status, n in sorted(counts.rounds.items()):
            rounds.add_metric([status], n)
            if status != "running":
                durations.add_metric([status], n, counts.round_seconds.get(status, 0.0))
        yield rounds
        yield durations
        gate = CounterMetricFamily(
            "kaizen_gate_decisions", "The gate's decisions on candidates.", labels=["decision"]
        )
        for decision in ("approved", "rejected"):
            gate.add_metric([decision], counts.gate_decisions.get(decision, 0))
        yield gate
        states = GaugeMetricFamily(
            "kaizen_adapter_state_info",
            "1 for each adapter version the registry holds live, by state.",
            labels=["adapter", "model", "state"],
        )
        for name, state in sorted(counts.adapters.items()):
            states.add_metric([name, self.model, state], 1)
        yield states
