"""The playground, a page for trying voices in a browser: GET / is its page, /playground/* its script and style
(static files shipped in the package, no build step, nothing fetched from elsewhere). The page uses the public API
only (/model_info, /v1/models, /synthesize, /add_speaker), with the API key typed into it when the service has one;
the page itself needs no key (auth.py), as a browser cannot send one when it opens a URL."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static" / "playground"
PREFIX = "/playground"


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


routes = [
    Route("/", page, methods=["GET"]),
    Mount(PREFIX, app=StaticFiles(directory=STATIC), name="playground"),
]
