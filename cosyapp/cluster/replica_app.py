"""The ASGI wrapper of one replica's Starlette app.

- Every HTTP answer and accepted WebSocket carries `X-Replica-Id`, so clients and tests see which replica served
  them (Ray Serve spreads requests over replicas; the id is Ray's replica id).
- The lifespan start-up completes only once the service is ready (models loaded and warmed up, what /health
  waits for), so Ray Serve routes nothing to a replica that would answer 503 "loading"; a model that fails to
  load fails the start-up, and Ray Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette

from cosyapp.server.state import ServiceState

Message = dict[str, Any]
REPLICA_HEADER = b"x-replica-id"
READY_POLL_S = 0.2


class ReplicaApp:
    def __init__(self, app: Starlette, replica_id: str) -> None:
        self.app = app
        self.replica_id = replica_id

    @property
    def service(self) -> ServiceState:
        return self.app.state.service

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                      send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._ready_then(send))
        else:
            await self.app(scope, receive, self._named(send))

    def _ready_then(self, send: Callable[[Message], Awaitable[None]]) -> Callable[[Message], Awaitable[None]]:
        async def send_when_ready(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                while self.service.status == "loading":
                    await asyncio.sleep(READY_POLL_S)
                if self.service.status == "error":
                    message = {"type": "lifespan.startup.failed", "message": f"model failed to load: "
                                                                             f"{self.service.error}"}
            await send(message)

        return send_when_ready

    def _named(self, send: Callable[[Message], Awaitable[None]]) -> Callable[[Message], Awaitable[None]]:
        header = (REPLICA_HEADER, self.replica_id.encode("ascii"))

        async def send_named(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        return send_named

    def check_health(self) -> None:
        """Raise unless the service is ready (Ray Serve's periodic health check; failing ones are replaced)."""
        if self.service.status != "ok":
            raise RuntimeError(f"service {self.service.status}: {self.service.error or 'not ready'}")
