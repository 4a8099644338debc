"""All routers, joined."""

from fastapi import APIRouter

from server.api.openapi import errors
from server.api.routes import (
    adapters,
    completions,
    continue_sink,
    dashboard,
    feedback,
    health,
    metrics,
    models,
    ops,
    resample,
    rounds,
    tabby,
)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(metrics.router)  # Prometheus: a metrics or ops token
api_router.include_router(completions.router)
api_router.include_router(models.router)
# Declared here, not on the routes: feedback answers 404 when no id in a batch is known.
api_router.include_router(
    feedback.router,
    responses=errors({404: "No completion id in the request is one this server served."}),
)
api_router.include_router(ops.router)
# CI-side exploration: alternatives of a served completion (plugins/PROTOCOL.md).
api_router.include_router(resample.router)
api_router.include_router(adapters.router)
api_router.include_router(rounds.router)
# The ops dashboard: its pages (a session cookie stands in for the token there) and its data.
api_router.include_router(dashboard.pages)
api_router.include_router(dashboard.router)
# Editors that speak their own protocols (Tabby's agent; Continue's data destination).
api_router.include_router(tabby.router)
api_router.include_router(continue_sink.router)
