"""The Starlette application: `create_app(settings)` builds it, the lifespan loads the model in the background.

The server accepts connections at once; /health answers 503 {"status": "loading"} until the backend is
loaded (on a thread, never on the event loop) and warmed up, then {"status": "ok", ...}. A model that fails
to load leaves the service up with /health 503 {"status": "error", "detail": why}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import AsyncIterator

from starlette.applications import Starlette

from cosyapp.config import Settings
from cosyapp.server.errors import EXCEPTION_HANDLERS
from cosyapp.server.routes import status, synthesize
from cosyapp.server.state import ServiceState

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
    loading = asyncio.create_task(state.load())
    try:
        yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        if state.engine is not None:
            await state.engine.close()


def create_app(settings: Settings) -> Starlette:
    app = Starlette(routes=[*status.routes, *synthesize.routes], exception_handlers=EXCEPTION_HANDLERS,
                    lifespan=lifespan)
    app.state.service = ServiceState(settings)
    return app
