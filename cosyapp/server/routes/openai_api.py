"""The OpenAI speech API, so that OpenAI's SDKs and the tools built on them (Home Assistant's bridges, chat
front-ends) can use the service:

    POST /v1/audio/speech   JSON {input, model, voice, instructions, response_format, speed, stream_format}
    GET  /v1/audio/voices   {"voices": ["default", <registered speakers>...]}
    GET  /v1/models         the loaded backends, as OpenAI's model list

A speech request becomes a request to the speech service, like POST /synthesize (same voices, modes and engine):
- model: a backend's name (cosyvoice2, cosyvoice3, fish) picks it (a 400 when the service does not load it); any other name
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
- sample_rate (an extension): the rate of the audio sent, e.g. 16000 (resampled on the server while streaming;
  X-Sample-Rate names it); default: the backend's. seed (an extension): an integer that makes the audio
  reproducible.
- stream_format: "audio" (default), or "sse": Server-Sent Events `speech.audio.delta` {audio: base64 of a
  pcm chunk} as the audio is made, then `speech.audio.done` (response_format pcm only).

Errors come before any audio, in OpenAI's shape: a 4xx/5xx status with JSON `{"error": {"message": ...,
"type": "invalid_request_error" (4xx) or "server_error" (5xx), "param": null, "code": null}}`.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import to_s16le
from cosyapp.config import LimitsSettings
from cosyapp.engine.registry import backend_names
from cosyapp.server.audio_responses import audio_response, speech_response, streamed_response
from cosyapp.server.bodies import audio_bytes, base64_size, read_json_object
from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields, sample_rate, seed
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import Recording, SpeechRequest, SpeechService, VoiceReference
from cosyapp.server.state import ServiceState
from cosyapp.voices import SPEAKER_ID

FIELDS = ("input", "model", "voice", "instructions", "response_format", "speed", "stream_format", "sample_rate",
          "seed")
DEFAULT_VOICE = "default"
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
STREAMED_FORMATS = ("pcm", "wav")
FILE_FORMATS = ("mp3", "opus", "flac")
# Room for the JSON framing and the short fields on top of the text (4 bytes per character at most in UTF-8).
BODY_ALLOWANCE = 16 * 1024


@dataclass(frozen=True)
class SpeechParams:
    speech: SpeechRequest
    format: str
    sse: bool


def _voice(fields: Fields, max_bytes: int) -> VoiceReference:
    """A registered speaker, a recording to clone (cross-lingual: no transcript comes with it), or the default."""
    voice = fields.get("voice", None)
    if isinstance(voice, dict):
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise ApiError(400, "voice as an object must be {\"id\": \"<voice id>\"}")
    elif voice is not None and not isinstance(voice, str):
        raise ApiError(400, f"voice must be a string or {{\"id\": ...}}; got {type(voice).__name__}")
    voice = (voice or "").strip()
    if not voice or voice == DEFAULT_VOICE or voice in OPENAI_VOICES:
        return VoiceReference()
    if SPEAKER_ID.fullmatch(voice):
        return VoiceReference(speaker=voice)
    if voice.lower().startswith(("http://", "https://")):
        raise ApiError(400, "voice URLs are not fetched: send the recording itself as base64")
    try:
        return VoiceReference(recordings=(Recording(audio_bytes(voice, "voice", max_bytes), "voice"),))
    except ApiError as e:
        if e.status_code == 413:
            raise
        raise ApiError(400, f"voice {voice[:40]!r} is neither a registered speaker id (letters, digits, '_', '.', '-') "
                            "nor base64 audio") from None


def parse_speech(body: dict[str, Any], limits: LimitsSettings) -> SpeechParams:
    fields = Fields(body, FIELDS)
    text = fields.text("input", required=True, limit=limits.max_text_chars)
    model = fields.text("model")
    audio_format = (fields.text("response_format") or "mp3").lower()
    if audio_format not in (*STREAMED_FORMATS, *FILE_FORMATS):
        raise ApiError(400, f"response_format must be one of {', '.join((*STREAMED_FORMATS, *FILE_FORMATS))}; "
                            f"got {quote(audio_format)}")
    speed = fields.number("speed", 1.0)
    if speed != 1.0:
        raise ApiError(400, f"speed {speed:g} is not supported: the model speaks at its own pace (speed 1.0)")
    stream_format = (fields.text("stream_format") or "audio").lower()
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, f"stream_format must be audio or sse; got {quote(stream_format)}")
    if stream_format == "sse" and audio_format != "pcm":
        raise ApiError(400, "stream_format sse sends base64 pcm chunks: use response_format pcm with it")
    speech = SpeechRequest(text=text, voice=_voice(fields, limits.max_upload_bytes),
                           instruction=fields.text("instructions", limit=limits.max_text_chars),
                           backend=model if model in backend_names() else None, sample_rate=sample_rate(fields),
                           seed=seed(fields))
    return SpeechParams(speech=speech, format=audio_format, sse=stream_format == "sse")


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
    service: SpeechService = request.app.state.speech

    async def answer(record: RequestRecord, headers: dict[str, str]) -> Response:
        limits = service.state.settings.limits
        limit = 4 * limits.max_text_chars + base64_size(limits.max_upload_bytes) + BODY_ALLOWANCE
        params = parse_speech(await read_json_object(request, limit), limits)
        started = await service.start(params.speech, record)
        if params.sse:
            return streamed_response(started, record, "text/event-stream", headers, encode=sse_delta,
                                     trailer=sse_event({"type": "speech.audio.done"}))
        return await audio_response(request, started, record, params.format, headers,
                                    stream=params.format in STREAMED_FORMATS)

    return await speech_response(service, answer, openai_error)


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
