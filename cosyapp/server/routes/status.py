"""GET /health, /model_info (the seed's fields plus the audio format, modes and speakers), /stats (the engine's
counters as JSON) and /metrics (Prometheus' text format, `metrics.py`)."""

from __future__ import annotations

from starlette.requests import Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import SAMPLE_FORMAT
from cosyapp.server.metrics import Metrics
from cosyapp.server.state import ServiceState

USAGE = "Use /synthesize endpoint with 'instruction' parameter (CosyVoice2/3)"


async def health(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    if state.status == "ok" and state.engine is not None:
        return JSONResponse({"status": "ok", "model_type": state.engine.info.model_type})
    return JSONResponse(state.not_ready(), status_code=503)


async def model_info(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    engine = state.ready_engine()  # ApiError 503 while loading; the app's handler writes it
    info = engine.info
    return JSONResponse({
        "model_type": info.model_type,
        "model_dir": info.model_dir,
        "default_instruction": state.default_instruction(engine),
        "usage": USAGE,
        "endpoint": "/synthesize",
        "sample_rate": info.sample_rate,
        "channels": 1,
        "sample_format": SAMPLE_FORMAT,
        "formats": ["pcm", "wav"],
        "modes": list(info.modes),
        "speakers": state.speakers.ids(),
        **({"lm_weights": info.lm_weights} if info.lm_weights else {}),
    })


async def stats(request: Request) -> JSONResponse:
    """Engine counters (requests admitted/rejected/cancelled, active streams, audio produced)."""
    state: ServiceState = request.app.state.service
    return JSONResponse(state.ready_engine().snapshot())


async def metrics(request: Request) -> Response:
    """Every counter and histogram of this app, for Prometheus to scrape (answers while the model loads, too)."""
    app_metrics: Metrics = request.app.state.metrics
    return Response(app_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
