"""Request bodies as the routes read them: size limits (refuse what is declared too large before reading it,
and what grows too large while it is read: chunked uploads declare nothing), JSON objects, forms, and audio files
sent inside a body as bytes or base64."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.types import Message

from cosyapp.server.errors import ApiError
from cosyapp.server.fields import Fields, form_values

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Largest text field of a form (a file part is limited by the body's limit only).
FIELD_PART_LIMIT = 64 * 1024


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


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 415 unless it is sent as application/json, 413 past `limit` bytes,
    400 when it is not valid JSON or not an object."""
    content_type = media_type(request)
    if content_type != "application/json":
        raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}: send application/json")
    body = await limited_request(request, limit).body()
    try:
        value = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


@contextlib.asynccontextmanager
async def read_form(request: Request, accepted: tuple[str, ...], limit: int, max_files: int,
                    part_limit: int = FIELD_PART_LIMIT) -> AsyncIterator[Fields]:
    """The form's fields (numbers and flags as text): 415 unless the body is a form, 413 past `limit` bytes. Its
    files are readable until the block ends."""
    content_type = media_type(request)
    if content_type not in FORM_TYPES:
        raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
                            "(or application/x-www-form-urlencoded)")
    form = await limited_request(request, limit).form(max_files=max_files, max_fields=2 * len(accepted),
                                                      max_part_size=part_limit)
    try:
        yield Fields(form_values(form), accepted, strings=True)
    finally:
        await form.close()


def audio_bytes(value: Any, what: str, max_bytes: int) -> bytes:
    """An audio file given as bytes (msgpack binary) or as a base64 string (JSON)."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{what} must be bytes or a base64 string; the string is not valid base64") from None
    if not isinstance(value, bytes):
        raise ApiError(400, f"{what} must be bytes or a base64 string")
    if not value:
        raise ApiError(400, f"{what} is empty")
    if len(value) > max_bytes:
        raise ApiError(413, f"{what} is too large: {len(value) / 2**20:.1f} MiB, the limit is "
                            f"{max_bytes / 2**20:g} MiB")
    return value


def base64_size(raw_bytes: int) -> int:
    """Length of the base64 text of `raw_bytes` bytes (body limits for recordings sent inside JSON or forms)."""
    return -(-raw_bytes // 3) * 4
