"""The FastAPI application: wires settings, database, engine, recorder and routes together.

Every request passes the request guard first (server/api/guard.py: authentication of /v1/*,
per-token limits, the body limit). Start-up refuses an un-migrated database, starts the
recorder, and loads the engine in the background (``/readyz`` answers 503 until it is ready).
Shutdown drains the recorder before the engine stops, so no record of a response already sent
is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.guard import RequestGuard
from server.api.limits import TokenLimiter
from server.api.main import api_router
from server.api.openapi import install_openapi
from server.api.routes.dashboard import DASHBOARD_PATHS
from server.config import Settings, get_settings
from server.engine.base import Engine
from server.engine.select import build_engine
from server.services.adapter_sync import AdapterSync
from server.services.auth import TokenAuthenticator
from server.services.completions import CompletionService
from server.services.dashboard import DashboardService
from server.services.feedback import FeedbackService
from server.services.metrics import Metrics
from server.services.recorder import DurableAckMiddleware, Recorder
from server.services.rollout_ops import RolloutOps
from server.services.sessions import DashboardSessions
from server.store.db import check_migrated, make_engine, make_session_factory
from server.store.journal import Journal

log = logging.getLogger(__name__)


async def _start_engine(engine: Engine, adapter_sync: AdapterSync) -> None:
    try:
        await engine.start()
        log.info("event=engine_ready model=%s", engine.model_name)
    except Exception:
        log.exception("event=engine_start_failed model=%s", engine.model_name)
        raise
    await adapter_sync.run()  # loads the registry's versions, then follows its changes


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. Tests pass a fake ``engine``; by default vLLM is built from settings."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db_engine = make_engine(settings.database_url)
        check_migrated(db_engine)
        session_factory = make_session_factory(db_engine)
        assert settings.journal_dir is not None
        recorder = Recorder(
            session_factory,
            journal=Journal(settings.journal_dir),
            drain_timeout=settings.recorder_drain_seconds,
        )
        recorder.start()  # replays what a crash or an outage left in the journal
        model_engine = engine or build_engine(settings)
        app.state.settings = settings
        app.state.session_factory = session_factory
        app.state.recorder = recorder
        app.state.authenticator = TokenAuthenticator(
            session_factory,
            settings.auth_cache_seconds,
            outage_grace=settings.auth_outage_grace_seconds,
            outage_cache_size=settings.auth_outage_cache_size,
        )
        adapter_sync = AdapterSync(
            engine=model_engine, session_factory=session_factory, settings=settings
        )
        adapter_sync.prime()
        app.state.adapter_sync = adapter_sync
        app.state.rollout = RolloutOps(adapter_sync)
        app.state.dashboard = DashboardService(session_factory, settings)
        app.state.dashboard_sessions = DashboardSessions(session_factory)
        app.state.metrics = metrics = Metrics(
            model=model_engine.model_name,
            router=adapter_sync.router,
            session_factory=session_factory,
        )
        app.state.completion_service = CompletionService(
            engine=model_engine,
            recorder=recorder,
            settings=settings,
            router=adapter_sync.router,
            metrics=metrics,
        )
        app.state.feedback_service = FeedbackService(session_factory, recorder, metrics)
        app.state.engine_task = asyncio.create_task(_start_engine(model_engine, adapter_sync))
        try:
            yield
        finally:
            app.state.engine_task.cancel()  # the start-up, or the rollout loop after it
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await app.state.engine_task
            await recorder.stop()
            await model_engine.shutdown()
            db_engine.dispose()
            log.info("event=shutdown_complete")

    app = FastAPI(
        title="Kaizen",
        version="0.1.0",
        description="An on-prem code assistant that improves from its users' test results. "
        "Every endpoint but the health probes needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # A response completes only once its record is journaled (see server/services/recorder.py).
    app.add_middleware(DurableAckMiddleware)
    app.include_router(api_router)
    install_openapi(app, settings)
    # Added last, so outermost: authentication, per-token limits and the body limit come before
    # anything reads the body (see server/api/guard.py).
    app.state.limiter = TokenLimiter(
        per_minute=settings.rate_limit_per_minute,
        burst=settings.rate_limit_burst,
        max_in_flight=settings.max_concurrent_per_token,
    )
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(
        RequestGuard,
        settings=settings,
        limiter=app.state.limiter,
        docs_paths=[path for path in docs if path],
        session_paths=DASHBOARD_PATHS,
    )
    return app
