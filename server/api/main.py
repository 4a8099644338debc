"""All routers, joined."""

from fastapi import APIRouter

from server.api.routes import adapters, completions, feedback, health, models, ops

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(completions.router)
api_router.include_router(models.router)
api_router.include_router(feedback.router)
api_router.include_router(ops.router)
api_router.include_router(adapters.router)
