"""Request-body size limits shared by the routes: refuse what is declared too large before reading it, and
what grows too large while it is read (chunked uploads declare nothing)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Message

from cosyapp.server.errors import ApiError


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def limited_request(request: Request, limit: int) -> Request:
    """`request` whose body reads raise ApiError 413 past `limit` bytes (also when Content-Length says so)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body too large: {int(declared) // 1024} KiB, the limit is {limit // 1024} KiB")
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, f"request body too large: the limit is {limit // 1024} KiB")
        return message

    return Request(request.scope, receive_limited)
