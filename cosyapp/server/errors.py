"""Every error leaves the service as JSON `{"detail": "..."}` with a 4xx/5xx status, never as a stack trace.

Routes raise `ApiError` (or `InputError`, whose message is written for the client); the handlers below turn
those, Starlette's own HTTP errors (404, 405, a malformed multipart body) and `EngineBusy` into JSON.
Anything unexpected becomes a 500 whose traceback goes to the server log only.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from cosyapp.engine.scheduler import EngineBusy
from cosyapp.engine.types import InputError

# What an error answer quotes of a client's value, and the longest detail it sends: an answer must never hand a
# client's megabytes back (nor cost them to build).
QUOTE_CHARS = 40
MAX_DETAIL_CHARS = 1000


def quote(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to a short prefix ("..." and the full length after)."""
    if isinstance(value, (str, bytes)) and len(value) > QUOTE_CHARS:
        return f"{value[:QUOTE_CHARS]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, int) and value.bit_length() > 64:  # str() of a huge integer is slow, or refused
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (list, dict, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


class ApiError(Exception):
    """An error answered to the client as `{"detail": detail}` with this status and headers."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        if len(detail) > MAX_DETAIL_CHARS:  # a message that quoted too much of the input: cut, never echoed whole
            detail = detail[:MAX_DETAIL_CHARS] + "..."
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers or {}


def as_api_error(exc: Exception) -> ApiError | None:
    """The client-facing form of an expected error; None for unexpected ones (bugs -> 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, EngineBusy):
        return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, str(exc.detail), dict(exc.headers or {}))
    return None


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


async def _expected(request: Request, exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    assert error is not None
    return error_response(error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this handler, so uvicorn logs the traceback server-side.
    return JSONResponse({"detail": "internal server error; see the service log"}, status_code=500)


EXCEPTION_HANDLERS = {
    ApiError: _expected,
    InputError: _expected,
    EngineBusy: _expected,
    HTTPException: _expected,
    Exception: _unexpected,
}
