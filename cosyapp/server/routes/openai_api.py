"""The OpenAI speech API, so that OpenAI's SDKs and the tools built on them (Home Assistant's bridges, chat
front-ends) can use the service:

    POST /v1/audio/speech   JSON {input, model, voice, instructions, response_format, speed, stream_format}
    GET  /v1/audio/voices   {"voices": ["default", <registered speakers>...]}
    GET  /v1/models         the loaded backends, as OpenAI's model list

A speech request becomes the same form as POST /synthesize (same voices, modes and engine):
- model: a backend's name (cosyvoice2, fish) picks it (a 400 when the service does not load it); any other name
  (tts-1, tts-1-hd, gpt-4o-mini-tts: what OpenAI clients send) means `[model] backend`.
- voice: a registered speaker id (`cosyapp speakers add`), a string or {"id": ...}; "default" and OpenAI's
  built-in voice names (alloy, ash, ...) mean the default prompt voice; a recording as base64 is cloned (the
  cross-lingual mode: no transcript comes with it), as Flash-TTS's OpenAI route does.
- instructions: the style instruction (/synthesize's `instruction`: the instruct2 mode).
- response_format: mp3 (the default, as in OpenAI's API), opus and flac come as one file once the text is
  synthesized; pcm and wav stream as the audio is made (pcm: s16le mono at the backend's rate, named in
  X-Sample-Rate, 24 kHz for CosyVoice2 as in OpenAI's API; wav: a header of unknown length, then the
  samples); aac is refused.
- speed: 1.0 only: the models have no speed control, and refusing says so where ignoring would not.
- stream_format: "audio" (default), or "sse": Server-Sent Events `speech.audio.delta` {audio: base64 of a
  pcm chunk} as the audio is made, then `speech.audio.done` (response_format pcm only).

Errors come before any audio, in OpenAI's shape: a 4xx/5xx status with JSON `{"error": {"message": ...,
"type": "invalid_request_error" (4xx) or "server_error" (5xx), "param": null, "code": null}}`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import AUDIO_MEDIA_TYPES, to_s16le, wav_header
from cosyapp.config import LimitsSettings
from cosyapp.engine.registry import backend_names
from cosyapp.server.audio_responses import RequestRecord, file_response, rejected, streamed_response
from cosyapp.server.bodies import audio_bytes, base64_size, read_json_object
from cosyapp.server.errors import ApiError
from cosyapp.server.routes.synthesize import SynthesisForm, start_stream
from cosyapp.server.state import ServiceState
from cosyapp.voices import SPEAKER_ID

FIELDS = ("input", "model", "voice", "instructions", "response_format", "speed", "stream_format")
DEFAULT_VOICE = "default"
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
STREAMED_FORMATS = ("pcm", "wav")
FILE_FORMATS = ("mp3", "opus", "flac")
# Room for the JSON framing and the short fields on top of the text (4 bytes per character at most in UTF-8).
BODY_ALLOWANCE = 16 * 1024


@dataclass(frozen=True)
class SpeechParams:
    form: SynthesisForm
    backend: str | None  # None: [model] backend
    sse: bool


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string; got {type(value).__name__}")
    return value.strip()


def _voice(body: dict[str, Any], max_bytes: int) -> tuple[str | None, bytes | None]:
    """(registered speaker, None), (None, recording to clone) or (None, None) for the default voice."""
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise ApiError(400, "voice as an object must be {\"id\": \"<voice id>\"}")
    elif voice is not None and not isinstance(voice, str):
        raise ApiError(400, f"voice must be a string or {{\"id\": ...}}; got {type(voice).__name__}")
    voice = (voice or "").strip()
    if not voice or voice == DEFAULT_VOICE or voice in OPENAI_VOICES:
        return None, None
    if SPEAKER_ID.fullmatch(voice):
        return voice, None
    if voice.lower().startswith(("http://", "https://")):
        raise ApiError(400, "voice URLs are not fetched: send the recording itself as base64")
    try:
        return None, audio_bytes(voice, "voice", max_bytes)
    except ApiError as e:
        if e.status_code == 413:
            raise
        raise ApiError(400, f"voice {voice[:40]!r} is neither a registered speaker id (letters, digits, '_', '.', '-') "
                            "nor base64 audio") from None


def parse_speech(body: dict[str, Any], limits: LimitsSettings) -> SpeechParams:
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; accepted fields: {', '.join(FIELDS)}")
    text = _string(body, "input")
    if not text:
        raise ApiError(400, "input is missing or empty: give the text to speak")
    if len(text) > limits.max_text_chars:
        raise ApiError(400, f"input is too long: {len(text)} characters, the limit is {limits.max_text_chars}")
    model = _string(body, "model")
    audio_format = (_string(body, "response_format") or "mp3").lower()
    if audio_format not in (*STREAMED_FORMATS, *FILE_FORMATS):
        raise ApiError(400, f"response_format must be one of {', '.join((*STREAMED_FORMATS, *FILE_FORMATS))}; "
                            f"got {audio_format!r}")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise ApiError(400, f"speed must be a number; got {speed!r}")
    if speed != 1.0:
        raise ApiError(400, f"speed {speed:g} is not supported: the model speaks at its own pace (speed 1.0)")
    stream_format = (_string(body, "stream_format") or "audio").lower()
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, f"stream_format must be audio or sse; got {stream_format!r}")
    if stream_format == "sse" and audio_format != "pcm":
        raise ApiError(400, "stream_format sse sends base64 pcm chunks: use response_format pcm with it")
    speaker, prompt_wav = _voice(body, limits.max_upload_bytes)
    form = SynthesisForm(text=text, instruction=_string(body, "instructions") or None, prompt_text=None,
                         prompt_wav=prompt_wav, speaker=speaker, format=audio_format)
    return SpeechParams(form=form, backend=model if model in backend_names() else None, sse=stream_format == "sse")


def openai_error(error: ApiError) -> JSONResponse:
    """An error in OpenAI's shape: OpenAI's SDKs show its message (of a `{"detail": ...}` body only the status)."""
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return JSONResponse({"error": {"message": error.detail, "type": kind, "param": None, "code": None}},
                        status_code=error.status_code, headers=error.headers)


def sse_event(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def sse_delta(chunk: np.ndarray) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(to_s16le(chunk)).decode("ascii")})


async def speech(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    record = RequestRecord(uuid.uuid4().hex[:12])
    headers = {"X-Request-Id": record.id}
    try:
        limits = state.settings.limits
        limit = 4 * limits.max_text_chars + base64_size(limits.max_upload_bytes) + BODY_ALLOWANCE
        params = parse_speech(await read_json_object(request, limit), limits)
        engine = state.ready_engine(params.backend)
        stream, first_chunk = await start_stream(state, engine, params.form, record)
    except Exception as e:
        return openai_error(rejected(e, record, headers))

    audio_format = params.form.format
    if params.sse:
        return streamed_response(stream, first_chunk, record, "text/event-stream", headers, encode=sse_delta,
                                 trailer=sse_event({"type": "speech.audio.done"}))
    if audio_format in STREAMED_FORMATS:
        header = wav_header(record.sample_rate) if audio_format == "wav" else b""
        return streamed_response(stream, first_chunk, record, AUDIO_MEDIA_TYPES[audio_format], headers, header)
    try:
        return await file_response(request, stream, first_chunk, record, audio_format, headers)
    except Exception as e:
        return openai_error(rejected(e, record, headers))


async def voices(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    return JSONResponse({"voices": [DEFAULT_VOICE, *state.speakers.ids()], "default_aliases": list(OPENAI_VOICES)})


async def models(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                     "owned_by": "cosyapp"} for name in state.backends]})


routes = [
    Route("/v1/audio/speech", speech, methods=["POST"]),
    Route("/v1/audio/voices", voices, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
]
