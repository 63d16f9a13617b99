"""Optional bearer-token authentication for every route but the health checks and the playground's static page,
WebSockets included.

With `[server] api_key` (or `cosyapp serve --api-key`) set, a request must carry `Authorization: Bearer <key>`;
anything else is answered 401 `{"detail": ...}` before it reaches a route. The token is compared with
`hmac.compare_digest` so the comparison time does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

# Load balancers and systemd probes check these without credentials; a browser opens the playground's page (and
# loads its script and style) without them too: the page asks for the key and sends it with its API requests.
OPEN_PATHS = frozenset({"/health", "/v1/health", "/"})
OPEN_PREFIXES = ("/playground/",)


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive), else None."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyMiddleware:
    """Pure ASGI middleware (streamed responses pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS \
                or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        token = bearer_token(header) if header is not None else None
        if token is None:
            detail = "missing API key: send the header 'Authorization: Bearer <key>'"
        elif not hmac.compare_digest(token, self.api_key):
            detail = "invalid API key"
        else:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await response(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await WebSocket(scope, receive, send).send_denial_response(response)  # the handshake gets the 401
        else:  # a server without the denial extension: the handshake gets a 403
            await send({"type": "websocket.close", "code": 1008, "reason": detail})
