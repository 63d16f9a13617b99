"""Request bodies as the routes read them: size limits (refuse what is declared too large before reading it,
and what grows too large while it is read: chunked uploads declare nothing), a time limit on reading them, JSON
and MessagePack documents, forms, and audio files sent inside a body as bytes or base64.

Every decoded document passes `checked_document` before a route sees it: at most MAX_DEPTH levels of nesting,
strings that are valid Unicode (JSON's "\ud800" escapes make lone surrogates no encoder or tokenizer takes), and
integers a 64-bit number holds. Each problem is a 400 naming where it is (`references[0].text`), so no route has to
guard against RecursionError, UnicodeEncodeError or OverflowError from deep inside a library."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from typing import Any, AsyncIterator

import ormsgpack

from starlette.requests import Request
from starlette.types import Message

from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields, form_values

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Largest text field of a form (a file part is limited by the body's limit only).
FIELD_PART_LIMIT = 64 * 1024
# Nesting of a decoded document: every API's bodies need 4 levels at most (tokens: body, list, grid, row).
MAX_DEPTH = 32
MAX_INTEGER = 2**63 - 1


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def limited_request(request: Request, limit: int) -> Request:
    """`request` whose body reads raise ApiError 413 past `limit` bytes (also when Content-Length says so), and 408
    when the whole body has not arrived `[server] body_timeout_s` after reading it began (a client trickling it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body too large: {int(declared) // 1024} KiB, the limit is {limit // 1024} KiB")
    received = 0
    body_timeout_s = request.app.state.service.settings.server.body_timeout_s
    deadline = time.monotonic() + body_timeout_s

    async def receive_limited() -> Message:
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {body_timeout_s:g} s") from None
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
    value = decode_document(await limited_request(request, limit).body(), "JSON")
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


def decode_document(data: bytes, kind: str, what: str = "the request body") -> Any:
    """A JSON or MessagePack (`kind`) document, checked by `checked_document`; a 400 saying `what` is not valid."""
    try:
        value = ormsgpack.unpackb(data) if kind == "MessagePack" else json.loads(data)
    except RecursionError:
        raise ApiError(400, f"the {kind} document is nested too deeply: at most {MAX_DEPTH} levels") from None
    except (ormsgpack.MsgpackDecodeError, ValueError) as e:
        if "recursion" in str(e).lower():
            raise ApiError(400, f"the {kind} document is nested too deeply: at most {MAX_DEPTH} levels") from None
        raise ApiError(400, f"{what} is not valid {kind}: {str(e)[:200]}") from None
    return checked_document(value, kind)


def checked_document(document: Any, kind: str = "JSON") -> Any:
    """`document` unchanged when its nesting, strings and integers are sane (module docstring); else a 400 naming
    the first bad place. Walks without recursion (the depth is what is being checked)."""
    pending: list[tuple[Any, str, int]] = [(document, "", 0)]
    while pending:
        value, where, depth = pending.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ApiError(400, f"the {kind} document is nested too deeply: at most {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(value, dict):
                    _check_scalar(key, f"{where} (a key)" if where else "a field name")
                    place = f"{where}.{key}" if where else str(key)
                else:
                    place = f"{where}[{key}]"
                pending.append((item, place[:200], depth + 1))
        else:
            _check_scalar(value, where or "the document")
    return document


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where}: not valid Unicode text: a lone surrogate "
                                f"{value[e.start:e.start + 1]!r} at character {e.start}") from None
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
        raise ApiError(400, f"{where}: {quote(value)} is out of range: integers must fit in 64 bits")


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
