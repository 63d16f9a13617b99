"""What every audio route shares once its speech has started: the streamed answer (ended and logged however the
client leaves), the answer sent as one file (abandoned when the client leaves first), and the error of a request
that failed before its first byte."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cosyapp.audio import AUDIO_MEDIA_TYPES, encode_audio, pcm_headers, to_s16le, wav_header
from cosyapp.server.errors import ApiError, as_api_error, error_response
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import Speech, SpeechService

# An adapter's answer to one request: its record (log line) and the headers every answer carries -> the response.
Answer = Callable[[RequestRecord, dict[str, str]], Awaitable[Response]]

log = logging.getLogger("cosyapp.request")


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


async def stream_body(speech: Speech, record: RequestRecord, header: bytes = b"",
                      encode: Callable[[np.ndarray], bytes] = to_s16le, trailer: bytes = b"") -> AsyncIterator[bytes]:
    """The body of a streamed answer: `header`, every chunk as `encode` makes it, `trailer` once the audio is
    complete. Cancels the stream and logs the request however the body ends."""
    result = "ok"
    try:
        if header:
            yield header
        record.audio_samples += speech.first.shape[0]
        yield encode(speech.first)
        async for chunk in speech.stream:
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
        speech.stream.cancel()
        record.finish(200, result)


def streamed_response(speech: Speech, record: RequestRecord, media_type: str, headers: dict[str, str],
                      header: bytes = b"", encode: Callable[[np.ndarray], bytes] = to_s16le,
                      trailer: bytes = b"") -> AudioStreamResponse:
    """The answer that streams the audio as it is made (`stream_body`), with the PCM layout in its headers."""

    def on_close() -> None:
        speech.stream.cancel()
        record.finish(200, "cancelled")

    return AudioStreamResponse(stream_body(speech, record, header, encode, trailer), on_close=on_close,
                               media_type=media_type, headers={**headers, **pcm_headers(speech.sample_rate)})


def stream_header(audio_format: str, sample_rate: int) -> bytes:
    """What a stream of `audio_format` (wav or pcm) starts with: wav, a WAV header of unknown length (players read
    on to the end of the stream); pcm, nothing."""
    return wav_header(sample_rate) if audio_format == "wav" else b""


async def audio_response(request: Request, speech: Speech, record: RequestRecord, audio_format: str,
                         headers: dict[str, str], stream: bool, wav_stream_header: bool = True) -> Response:
    """The audio in `audio_format`: streamed as it is made (pcm, or wav: a header of unknown length first unless
    `wav_stream_header` is off) or sent as one file once complete. Errors before the answer is ready are raised."""
    if stream:
        header = stream_header(audio_format, speech.sample_rate) if wav_stream_header else b""
        return streamed_response(speech, record, AUDIO_MEDIA_TYPES[audio_format], headers, header)
    return await file_response(request, speech, record, audio_format, headers)


async def file_response(request: Request, speech: Speech, record: RequestRecord, audio_format: str,
                        headers: dict[str, str]) -> Response:
    """The answer that sends all of the audio as one `audio_format` file once it is made; 499 (to nobody) when
    the client left first. Errors before the answer is ready are raised."""
    audio = await _whole_audio(request, speech)
    if audio is None:
        record.finish(499, "cancelled")
        return Response(status_code=499)
    record.audio_samples = audio.shape[0]
    data = await asyncio.to_thread(encode_audio, audio, speech.sample_rate, audio_format)
    record.ttfb_s = time.perf_counter() - record.started  # the client's first byte is the file's
    record.finish(200, "ok")
    return Response(data, media_type=AUDIO_MEDIA_TYPES[audio_format], headers=headers)


async def _whole_audio(request: Request, speech: Speech) -> np.ndarray | None:
    """All of the audio for an answer sent in one piece; None when the client went away first (the synthesis is
    cancelled then). Cancels the stream on any error."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.create_task(speech.whole()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        return None
    finally:
        watching.cancel()
        collecting.cancel()
        speech.stream.cancel()


def rejected(error: Exception, record: RequestRecord, headers: dict[str, str]) -> ApiError:
    """The client-facing form of an error that ended a request before its first byte (with `headers` added),
    logged; unexpected errors (bugs) are logged and raised for the 500 handler."""
    api_error = as_api_error(error)
    if api_error is None:
        record.finish(500, f"error({type(error).__name__})")
        raise error
    record.finish(api_error.status_code, f"rejected({api_error.detail})")
    return ApiError(api_error.status_code, api_error.detail, {**api_error.headers, **headers})


async def speech_response(speech: SpeechService, answer: Answer,
                          error: Callable[[ApiError], Response] = error_response) -> Response:
    """`answer` a new request (its id in X-Request-Id); an error before its first byte is answered by `error` (the
    API's error shape) and logged."""
    record = speech.record()
    headers = {"X-Request-Id": record.id}
    try:
        return await answer(record, headers)
    except asyncio.CancelledError:
        record.finish(499, "cancelled")  # the client left before the answer started (disconnect.py)
        raise
    except Exception as e:
        return error(rejected(e, record, headers))
