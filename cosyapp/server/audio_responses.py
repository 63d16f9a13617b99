"""What every audio route shares once it has a stream: the request's log line, the streamed answer (ended and
logged however the client leaves), the answer sent as one file (abandoned when the client leaves first), and
the error of a request that failed before its first byte."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cosyapp.audio import AUDIO_MEDIA_TYPES, encode_audio, pcm_headers, to_s16le
from cosyapp.engine.scheduler import SynthesisStream
from cosyapp.server.errors import ApiError, as_api_error

log = logging.getLogger("cosyapp.request")


class RequestRecord:
    """Timing of one request, written as one log line when it ends (however it ends)."""

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.started = time.perf_counter()
        self.mode = "-"
        self.text_chars = 0
        self.ttfb_s: float | None = None
        self.audio_samples = 0
        self.sample_rate = 0
        self._done = False

    def finish(self, status: int, result: str) -> None:
        if self._done:
            return
        self._done = True
        wall_s = time.perf_counter() - self.started
        audio_s = self.audio_samples / self.sample_rate if self.sample_rate else 0.0
        ttfb = f"{1000 * self.ttfb_s:.0f}" if self.ttfb_s is not None else "-"
        rtf = f"{wall_s / audio_s:.3f}" if audio_s > 0 else "-"
        log.info("request id=%s status=%d mode=%s text_chars=%d ttfb_ms=%s audio_s=%.2f wall_s=%.2f rtf=%s result=%s",
                 self.id, status, self.mode, self.text_chars, ttfb, audio_s, wall_s, rtf, result)


class AudioStreamResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the response ends, even when the client left before
    the body started (Starlette then never starts the body iterator, so its `finally` would not run)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


async def stream_body(stream: SynthesisStream, first: np.ndarray, record: RequestRecord, header: bytes = b"",
                      encode: Callable[[np.ndarray], bytes] = to_s16le, trailer: bytes = b""
                      ) -> AsyncIterator[bytes]:
    """The body of a streamed answer: `header`, every chunk (the first one already taken) as `encode` makes it,
    `trailer` once the audio is complete. Cancels the stream and logs the request however the body ends."""
    result = "ok"
    try:
        if header:
            yield header
        yield encode(first)
        async for chunk in stream:
            record.audio_samples += chunk.shape[0]
            yield encode(chunk)
        if trailer:
            yield trailer
    except Exception as e:  # after the first byte the status is sent: end the stream early, log why
        result = f"failed({type(e).__name__}: {e})"
        log.error("request id=%s failed mid-stream", record.id, exc_info=e)
    except BaseException:  # the client went away (task cancelled) or the generator was closed
        result = "cancelled"
        raise
    finally:
        stream.cancel()
        record.finish(200, result)


def streamed_response(stream: SynthesisStream, first: np.ndarray, record: RequestRecord, media_type: str,
                      headers: dict[str, str], header: bytes = b"", encode: Callable[[np.ndarray], bytes] = to_s16le,
                      trailer: bytes = b"") -> AudioStreamResponse:
    """The answer that streams the audio as it is made (`stream_body`), with the PCM layout in its headers."""

    def on_close() -> None:
        stream.cancel()
        record.finish(200, "cancelled")

    return AudioStreamResponse(stream_body(stream, first, record, header, encode, trailer), on_close=on_close,
                               media_type=media_type, headers={**headers, **pcm_headers(record.sample_rate)})


async def file_response(request: Request, stream: SynthesisStream, first: np.ndarray, record: RequestRecord,
                        audio_format: str, headers: dict[str, str]) -> Response:
    """The answer that sends all of the audio as one `audio_format` file once it is made; 499 (to nobody) when
    the client left first. Errors before the answer is ready are raised."""
    audio = await _whole_audio(request, stream, first)
    if audio is None:
        record.finish(499, "cancelled")
        return Response(status_code=499)
    record.audio_samples = audio.shape[0]
    data = await asyncio.to_thread(encode_audio, audio, record.sample_rate, audio_format)
    record.ttfb_s = time.perf_counter() - record.started  # the client's first byte is the file's
    record.finish(200, "ok")
    return Response(data, media_type=AUDIO_MEDIA_TYPES[audio_format], headers=headers)


async def _whole_audio(request: Request, stream: SynthesisStream, first: np.ndarray) -> np.ndarray | None:
    """All of the stream's audio (the first chunk already taken) for an answer sent in one piece; None when the
    client went away first (the synthesis is cancelled then). Cancels the stream on any error."""

    async def collect() -> np.ndarray:
        return np.concatenate([first, *[chunk async for chunk in stream]])

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.create_task(collect()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        return None
    finally:
        watching.cancel()
        collecting.cancel()
        stream.cancel()


def rejected(error: Exception, record: RequestRecord, headers: dict[str, str]) -> ApiError:
    """The client-facing form of an error that ended a request before its first byte (with `headers` added),
    logged; unexpected errors (bugs) are logged and raised for the 500 handler."""
    api_error = as_api_error(error)
    if api_error is None:
        record.finish(500, f"error({type(error).__name__})")
        raise error
    record.finish(api_error.status_code, f"rejected({api_error.detail})")
    return ApiError(api_error.status_code, api_error.detail, {**api_error.headers, **headers})
