"""``GET /metrics``: Prometheus' text format, for a ``metrics`` token (a scraper's) or ops.

Point Prometheus at every replica with the token in ``authorization`` (see the README's
"Metrics" section); :mod:`server.services.metrics` says what each series is.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import MetricsDep, MetricsRole

router = APIRouter(tags=["ops"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
)
async def get_metrics(metrics: MetricsDep, _: MetricsRole) -> Response:
    """Kaizen's series per adapter version, the loop's counts, and vLLM's engine metrics."""
    body = await asyncio.to_thread(metrics.exposition)  # reads the database
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
