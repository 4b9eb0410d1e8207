"""The queen's HTTP application: OpenAI's routes, health, and the routers
other parts of the queen add (metrics, the web page)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from rbee.config import VERSION
from rbee_queen.http import errors
from rbee_queen.http.auth import Authenticator
from rbee_queen.http.guard import RequestGuard


def create_app(auth: Authenticator, router: Any = None, queen: Any = None) -> FastAPI:
    """``router``: the Router that finds a worker for a model (routing.py);
    ``queen``: the QueenServer, for routers that need more of it."""
    app = FastAPI(title="rbee", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.auth = auth
    app.state.router = router
    app.state.queen = queen
    errors.install(app)
    # No body read without a key, bodies bounded, browser headers (guard.py).
    app.add_middleware(RequestGuard)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": VERSION}

    if router is not None:
        from rbee_queen.http.routes_openai import router as openai_routes

        app.include_router(openai_routes)
    from rbee_queen.http.web import router as web_routes  # the cluster's web page (docs/web.md)

    app.include_router(web_routes)
    return app
