"""Fish Audio's live WebSocket TTS, `/v1/tts/live`: text streams in (an LLM's answer, as it is written) and audio
streams out. The Fish SDKs' WebSocket sessions speak it (`fish_audio_sdk.WebSocketSession.tts`, fishaudio's
`stream_websocket`) with the base URL pointed here.

Every frame is MessagePack. Client -> server: {"event": "start", "request": TTSRequest} first, then any number
of {"event": "text", "text": ...}, {"event": "flush"} (speak what is buffered now) and finally {"event": "stop"}
(speak the rest). Server -> client: {"event": "audio", "audio": <bytes>} as audio is made, then {"event":
"finish", "reason": "stop"}; a bad request or a failure ends the session with {"event": "error", "error": why}
and {"event": "finish", "reason": "error"}. The server closes the socket after the finish event.

Text is spoken in segments, in order, each one synthesis on the Fish engine with the session's voice
(`references` or `reference_id`, as on /v1/tts): a segment ends at a sentence end once it holds at least
`min_chunk_length` characters, or at the last break before `chunk_length` characters when no sentence ends in
time (`text_segments.TextSegmenter`); flush and stop speak whatever is buffered.

Formats: pcm (s16le mono at the model's 44.1 kHz) and wav (the same, with a WAV header of unknown length at the
start of the first audio event) stream as each segment is synthesized; mp3 (the Fish default) comes as each
segment's MP3 frames once it is synthesized, without the header frame that would give a player the length of
that segment alone, so the pieces make one MP3 stream; opus and flac are refused (their containers do not
join). `sample_rate` (one of audio.SAMPLE_RATES; default: the model's 44.1 kHz) is the rate of every audio event,
resampled on the server while it streams; `prosody` must be absent or neutral (speed 1, volume 0).
`mp3_bitrate`, `opus_bitrate`, `latency`, `normalize`, `condition_on_previous_chunks` and `early_stop_threshold`
are validated and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from typing import Any

import ormsgpack
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from cosyapp.audio import encode_audio, mp3_stream_piece, to_s16le
from cosyapp.server.audio_responses import stream_header
from cosyapp.server.bodies import decode_document
from cosyapp.server.errors import ApiError, as_api_error, quote
from cosyapp.server.fields import Fields, check_length
from cosyapp.server.fish_wire import TTS_FIELDS, TTSParams, fish_served, parse_tts
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import NoAudio, SpeechService
from cosyapp.server.text_segments import TextSegmenter

# The live TTSRequest: /v1/tts's fields (less `streaming`: a live session always streams) and the cloud API's.
LIVE_FIELDS = (*(name for name in TTS_FIELDS if name != "streaming"), "mp3_bitrate", "opus_bitrate", "prosody",
               "min_chunk_length", "condition_on_previous_chunks", "early_stop_threshold")
LIVE_FORMATS = ("pcm", "wav", "mp3")


@dataclass(frozen=True)
class LiveParams:
    tts: TTSParams  # speech.text: what the start request already holds (usually "")
    min_chunk_length: int
    chunk_length: int


def parse_start(payload: Any, speech: SpeechService) -> LiveParams:
    """The session's start event: its TTSRequest with /v1/tts's defaults and ranges (mp3 by default, as the Fish
    cloud), and the live-only fields checked (see the module docstring)."""
    if not isinstance(payload, dict) or payload.get("event") != "start":
        raise ApiError(400, "the first event must be {\"event\": \"start\", \"request\": {...}}")
    fields = Fields(payload.get("request"), LIVE_FIELDS)
    tts = parse_tts(fields, speech.state, default_format="mp3", text_required=False)
    if tts.format not in LIVE_FORMATS:
        raise ApiError(400, f"format {tts.format} cannot be streamed live; use one of {', '.join(LIVE_FORMATS)}")
    bitrates = (("mp3_bitrate", 128, (64, 128, 192)), ("opus_bitrate", 32, (-1000, 24, 32, 48, 64)))
    for name, default, choices in bitrates:
        if fields.integer(name, default) not in choices:
            raise ApiError(400, f"{name} must be one of {', '.join(map(str, choices))}")
    prosody = fields.get("prosody", None, nullable=True)
    if prosody is not None:
        neutral = Fields(prosody, ("speed", "volume", "normalize_loudness"))
        if neutral.number("speed", 1.0, 0.5, 2.0) != 1.0 or neutral.number("volume", 0.0, -20.0, 20.0) != 0.0:
            raise ApiError(400, "prosody is not supported: the model speaks at its own speed and volume "
                                "(leave prosody out, or speed 1 and volume 0)")
    fields.boolean("condition_on_previous_chunks", True)
    fields.number("early_stop_threshold", 1.0, 0.0, 1.0)
    # The Fish backend checks its options once for the whole session; its chunk_length is the segment length.
    chunk_length = speech.parse_options(tts.speech).chunk_length
    min_chunk_length = fields.integer("min_chunk_length", 50, 0, chunk_length)
    return LiveParams(tts=tts, min_chunk_length=min_chunk_length, chunk_length=chunk_length)


async def receive_event(websocket: WebSocket) -> dict[str, Any]:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data = message.get("bytes")
    if data is None:
        raise ApiError(400, "every frame must be binary MessagePack")
    event = decode_document(data, "MessagePack", "a frame")
    if not isinstance(event, dict):
        raise ApiError(400, "every event must be a map with an 'event' field")
    return event


async def send_event(websocket: WebSocket, event: dict[str, Any]) -> None:
    await websocket.send_bytes(ormsgpack.packb(event))


async def receive_text(websocket: WebSocket, segmenter: TextSegmenter, segments: asyncio.Queue[str | None],
                       record: RequestRecord, max_event_chars: int) -> None:
    """Text, flush and stop events -> segments to speak, then None after stop. A text event holds at most
    `max_event_chars` characters ([limits] max_text_chars, every API's text limit)."""
    while True:
        event = await receive_event(websocket)
        kind = event.get("event")
        if kind == "text":
            text = event.get("text")
            if not isinstance(text, str):
                raise ApiError(400, "a text event needs a string 'text'")
            check_length(text, max_event_chars, "the text event's text")
            record.text_chars += len(text)
            ready = segmenter.add(text)
        elif kind == "flush":
            ready = segmenter.flush()
        elif kind == "stop":
            for segment in segmenter.flush():
                segments.put_nowait(segment)
            segments.put_nowait(None)
            return
        else:
            raise ApiError(400, f"unknown event {quote(kind)}: send text, flush or stop events")
        for segment in ready:
            segments.put_nowait(segment)


async def speak(websocket: WebSocket, speech: SpeechService, params: LiveParams,
                segments: asyncio.Queue[str | None], record: RequestRecord) -> None:
    """Synthesize the segments in order, sending their audio as it is made (mp3: once per segment)."""
    audio_format = params.tts.format
    header = b""

    async def send_audio(data: bytes) -> None:
        nonlocal header
        await send_event(websocket, {"event": "audio", "audio": header + data})
        header = b""

    while (text := await segments.get()) is not None:
        try:
            synthesis = await speech.start(replace(params.tts.speech, text=text, stream=True), record)
        except NoAudio:
            continue  # nothing speakable in this segment (e.g. only punctuation): go on with the next
        if record.audio_samples == 0:
            header = stream_header(audio_format, synthesis.sample_rate)  # at the start of the first audio event
        if audio_format == "mp3":
            audio = await synthesis.whole()
            record.audio_samples += audio.shape[0]
            encoded = await asyncio.to_thread(encode_audio, audio, synthesis.sample_rate, "mp3")
            await send_audio(mp3_stream_piece(encoded))
            continue
        try:
            record.audio_samples += synthesis.first.shape[0]
            await send_audio(to_s16le(synthesis.first))
            async for chunk in synthesis.stream:
                record.audio_samples += chunk.shape[0]
                await send_audio(to_s16le(chunk))
        finally:
            synthesis.stream.cancel()


async def live(websocket: WebSocket) -> None:
    speech: SpeechService = websocket.app.state.speech
    record = speech.record("fish_live")
    await websocket.accept()
    tasks: list[asyncio.Task] = []
    try:
        start = await receive_event(websocket)  # answered even when there is no Fish engine to serve it
        fish_served(speech.state)
        params = parse_start(start, speech)
        segmenter = TextSegmenter(params.min_chunk_length, params.chunk_length)
        segments: asyncio.Queue[str | None] = asyncio.Queue()
        record.text_chars = len(params.tts.speech.text)
        for segment in segmenter.add(params.tts.speech.text):
            segments.put_nowait(segment)
        max_event_chars = speech.state.settings.limits.max_text_chars
        tasks = [asyncio.create_task(receive_text(websocket, segmenter, segments, record, max_event_chars)),
                 asyncio.create_task(speak(websocket, speech, params, segments, record))]
        pending = set(tasks)
        while pending:  # the first failure (a bad event, a failed synthesis, the client leaving) ends the session
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        await send_event(websocket, {"event": "finish", "reason": "stop"})
        record.finish(101, "ok")
    except WebSocketDisconnect:
        record.finish(101, "cancelled")
    except Exception as e:
        error = as_api_error(e)
        record.finish(101, f"failed({error.detail if error else type(e).__name__})")
        detail = error.detail if error is not None else "internal server error; see the service log"
        with contextlib.suppress(WebSocketDisconnect):  # the client may be gone already
            await send_event(websocket, {"event": "error", "error": detail})
            await send_event(websocket, {"event": "finish", "reason": "error"})
        if error is None:
            raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if websocket.client_state is WebSocketState.CONNECTED:
            await websocket.close()


routes = [WebSocketRoute("/v1/tts/live", live)]
