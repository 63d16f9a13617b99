"""Stop a request's handler when its client goes away before the answer starts.

Starlette notices a client that hangs up only while it streams an answer. Before that a handler may wait a long
time: for a synthesis slot (queued behind busy ones), for the first audio, or for a whole non-streamed answer.
A client that is gone would keep its queue place and its slot all that while, and a queue full of such requests
turns live clients away with 503. `CancelOnDisconnect` cancels the handler's task as soon as the server reports
`http.disconnect`; the speech service and the engine release a cancelled request's place (`Admission.release`
in `SpeechService.start`, the slot wait in `Engine.start`/`Engine.run`).

The server can only report the disconnect once the handler has read the whole body (the body's messages come
first), so the watch starts then. Once the answer has started, the response's own disconnect handling applies.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away


class CancelOnDisconnect:
    """ASGI middleware: cancel an HTTP handler whose client disconnects before its answer starts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = _DisconnectWatch(receive)
        handler = asyncio.create_task(self.app(scope, watch.receive, watch.wrap_send(send)))
        watch.handler = handler
        try:
            await handler
        except asyncio.CancelledError:
            if not watch.cancelled_handler:
                raise  # the server itself is cancelling this request (shutting down)
            # Nobody reads this answer (the server drops what is sent after a disconnect); the middleware
            # outside (request metrics) sees the request end as "client closed request" rather than as a failure.
            await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        finally:
            handler.cancel()
            await watch.close()


class _DisconnectWatch:
    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._listener: asyncio.Task | None = None
        self._disconnect: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.handler: asyncio.Task | None = None
        self.response_started = False
        self.cancelled_handler = False

    async def receive(self) -> Message:
        if self._listener is not None:  # the body is read: the next message is the disconnect
            return await asyncio.shield(self._disconnect)
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._disconnected(message)
        elif not message.get("more_body", False):
            self._listener = asyncio.create_task(self._listen())
        return message

    def wrap_send(self, send: Send) -> Send:
        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.response_started = True
            await send(message)

        return watched_send

    async def _listen(self) -> None:
        self._disconnected(await self._receive())

    def _disconnected(self, message: Message) -> None:
        if not self._disconnect.done():
            self._disconnect.set_result(message)
        if not self.response_started and self.handler is not None and not self.handler.done():
            self.cancelled_handler = True
            self.handler.cancel()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
