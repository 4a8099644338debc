"""All routers, joined."""

from fastapi import APIRouter

from server.api.routes import completions, health, models

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(completions.router)
api_router.include_router(models.router)
