"""The Starlette application: `create_app(settings)` builds it, the lifespan loads the model in the background.

The server accepts connections at once; /health answers 503 {"status": "loading"} until the backend is
loaded (on a thread, never on the event loop) and warmed up, then {"status": "ok", ...}. A model that fails
to load leaves the service up with /health 503 {"status": "error", "detail": why}.

Routes: the seed's /synthesize, the status routes (with Prometheus' /metrics), the Fish Speech API
(`routes/fish_api.py`, `routes/fish_async.py`), Fish's live WebSocket (`routes/fish_live.py`), the Flash-TTS API
(`routes/flash_api.py`), the OpenAI speech API (`routes/openai_api.py`) and the voice agent (`routes/agent.py`), every one behind the optional API
key (`auth.py`) except the health checks. Every route that speaks goes through the speech service (`speech.py`).
GET / is the playground (`routes/playground.py`), a browser page on the public API.
With `[wyoming] enabled`, the Wyoming TTS server for Home Assistant (`wyoming_tts.py`) listens on its own port,
started and stopped with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware

from cosyapp.agent.service import AgentService
from cosyapp.config import Settings
from cosyapp.server.auth import ApiKeyMiddleware
from cosyapp.server.disconnect import CancelOnDisconnect
from cosyapp.server.errors import EXCEPTION_HANDLERS
from cosyapp.server.fish_tasks import TaskManager
from cosyapp.server.memory import release_memory_periodically
from cosyapp.server.metrics import Metrics, RequestCounter
from cosyapp.server.routes import (agent, fish_api, fish_async, fish_live, flash_api, openai_api, playground,
                                   status, synthesize)
from cosyapp.server.speech import SpeechService
from cosyapp.server.state import ServiceState
from cosyapp.server.wyoming_tts import WyomingServer

log = logging.getLogger("cosyapp.server")


def configure_logging(level: str) -> None:
    """Everything (ours and uvicorn's) to stdout, one line per record, so journald keeps it."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    wyoming: WyomingServer | None = app.state.wyoming
    if wyoming is not None:
        await wyoming.start()  # a port that is taken stops the start-up here, with the reason
    loading = asyncio.create_task(state.load(app.state.speech.warm_up))
    releasing = asyncio.create_task(release_memory_periodically())
    try:
        yield
    finally:
        if wyoming is not None:
            await wyoming.stop()
        for task in (loading, releasing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.fish_tasks.close()
        await app.state.agent.close()
        for engine in state.engines.values():
            await engine.close()


def create_app(settings: Settings) -> Starlette:
    state = ServiceState(settings)
    metrics = Metrics(state)
    routes = [*status.routes, *synthesize.routes, *fish_api.routes, *fish_async.routes, *fish_live.routes,
              *flash_api.routes, *openai_api.routes, *playground.routes, *agent.routes]
    # Counted outermost, so that requests refused for a missing API key count too.
    middleware = [Middleware(RequestCounter, metrics=metrics, routes=routes)]
    if settings.server.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=settings.server.api_key))
    middleware.append(Middleware(CancelOnDisconnect))  # innermost: what it cancels is the handler alone
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.service = state
    app.state.metrics = metrics
    app.state.speech = SpeechService(state, metrics)
    app.state.agent = AgentService(settings, app.state.speech)
    app.state.wyoming = WyomingServer(settings.wyoming, app.state.speech) if settings.wyoming.enabled else None
    app.state.fish_tasks = TaskManager(state.store.tasks, settings.fishapi.keep_tasks_hours * 3600)
    return app
