"""Flash-TTS's HTTP API (seed 003) on the configured backend, a thin adapter like /synthesize:

    POST /speak            JSON {name, text, pitch, speed, temperature, top_k, top_p, max_tokens, stream,
                           response_format}: a registered speaker (a "role") reads the text
    POST /clone_voice      form (urlencoded or multipart): text, reference_audio (base64) or reference_audio_file
                           (upload), reference_text, and /speak's options: the uploaded voice reads the text
    POST /add_speaker      multipart: name, audio_file (upload) or audio (base64), reference_text
    POST /delete_speaker   form: name
    GET  /audio_roles      {"success": true, "roles": [...]}
    GET  /server_info      {"model", "roles", "sample_rate"}

Roles are the speaker registry's voices (`cosyapp speakers`, /v1/references/*). A role with a transcript reads
in the zero-shot mode, one without in the cross-lingual mode; so does a cloned voice with and without
`reference_text` (as /synthesize's speaker and prompt_wav).

Answers: `response_format` mp3 (default), opus, flac, wav or pcm, the whole file once synthesized; with
`stream: true`, wav (a header of unknown length, then the samples) or pcm stream as the audio is made (s16le
mono at the backend's rate, also in X-Sample-Rate: 24 kHz for CosyVoice2, where Spark-TTS had 16 kHz). Errors
are `{"detail": ...}` with a 4xx status.

Where it differs from Flash-TTS: `pitch` and `speed` take only `moderate` (the models have no such control,
and refusing says so where ignoring would not); `temperature`, `top_k`, `top_p`, `max_tokens`,
`length_threshold` and `window_size` are checked and change nothing (the model samples as it was trained to);
voices are not fetched from URLs (send the audio itself); `latent_file` (MegaTTS3 only) is refused.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import AUDIO_MEDIA_TYPES
from cosyapp.server.audio_responses import audio_response, speech_response
from cosyapp.server.bodies import audio_bytes, base64_size, read_form, read_json_object
from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import Recording, SpeechRequest, SpeechService, VoiceReference
from cosyapp.server.state import ServiceState
from cosyapp.voices import validate_speaker_id

LEVELS = ("very_low", "low", "moderate", "high", "very_high")
STREAMED_FORMATS = ("wav", "pcm")
OPTION_FIELDS = ("pitch", "speed", "temperature", "top_k", "top_p", "max_tokens", "length_threshold",
                 "window_size", "stream", "response_format")
SPEAK_FIELDS = ("name", "text", *OPTION_FIELDS)
CLONE_FIELDS = ("text", "reference_audio", "reference_audio_file", "reference_text", "latent_file", *OPTION_FIELDS)
ADD_FIELDS = ("name", "audio", "audio_file", "reference_text", "latent_file")


def read_options(fields: Fields) -> tuple[str, bool]:
    """The options /speak and /clone_voice share, checked -> (response_format, stream)."""
    for name in ("pitch", "speed"):
        level = fields.text(name) or "moderate"
        if level not in LEVELS:
            raise ApiError(400, f"{name} must be one of {', '.join(LEVELS)}; got {quote(level)}")
        if level != "moderate":
            raise ApiError(400, f"{name} {level} is not supported: the model speaks at its own {name} (moderate)")
    fields.number("temperature", None, 0.0, 100.0)
    fields.number("top_p", None, 0.0, 1.0)
    for name in ("top_k", "max_tokens", "length_threshold", "window_size"):
        fields.integer(name, None, 1, 1_000_000, nullable=True)
    audio_format = (fields.text("response_format") or "mp3").lower()
    if audio_format not in AUDIO_MEDIA_TYPES:
        raise ApiError(400, f"response_format must be one of {', '.join(AUDIO_MEDIA_TYPES)}; got {quote(audio_format)}")
    stream = fields.boolean("stream", False)
    if stream and audio_format not in STREAMED_FORMATS:
        raise ApiError(400, f"stream: true sends {' or '.join(STREAMED_FORMATS)}; got response_format {audio_format}")
    return audio_format, stream


async def voice_audio(fields: Fields, text_name: str, file_name: str, max_bytes: int) -> bytes | None:
    """The voice recording of a form: an uploaded file, or base64 text (not a URL: nothing is fetched)."""
    if fields.get("latent_file", None) is not None:
        raise ApiError(400, "latent_file is for MegaTTS3 voices; this model needs only the recording")
    upload, encoded = fields.get(file_name, None), fields.get(text_name, None)
    if upload is not None and encoded is not None:
        raise ApiError(400, f"give either {file_name} or {text_name}, not both")
    if upload is not None:
        if not isinstance(upload, UploadFile):
            raise ApiError(400, f"{file_name} must be a file upload")
        return audio_bytes(await upload.read(), file_name, max_bytes)
    if encoded is None:
        return None
    if isinstance(encoded, str) and encoded.strip().lower().startswith(("http://", "https://")):
        raise ApiError(400, f"{text_name}: URLs are not fetched; send the recording itself (base64, or "
                            f"{file_name} as a file)")
    return audio_bytes(encoded, text_name, max_bytes)


def _form_limits(state: ServiceState) -> tuple[int, int]:
    """(body limit, part limit) of forms that carry a recording, as a file or as base64."""
    max_bytes = state.settings.limits.max_upload_bytes
    return 2 * base64_size(max_bytes), base64_size(max_bytes)


async def read_speak(request: Request, state: ServiceState) -> tuple[SpeechRequest, str, bool]:
    body = await read_json_object(request, 4 * state.settings.limits.max_text_chars + 16 * 1024)
    fields = Fields(body, SPEAK_FIELDS, strings=True)
    name = fields.text("name", required=True)
    audio_format, stream = read_options(fields)
    text = fields.text("text", required=True, limit=state.settings.limits.max_text_chars)
    return SpeechRequest(text=text, voice=VoiceReference(speaker=name)), audio_format, stream


async def read_clone(request: Request, state: ServiceState) -> tuple[SpeechRequest, str, bool]:
    limit, part_limit = _form_limits(state)
    async with read_form(request, CLONE_FIELDS, limit, max_files=2, part_limit=part_limit) as fields:
        prompt_wav = await voice_audio(fields, "reference_audio", "reference_audio_file",
                                       state.settings.limits.max_upload_bytes)
    if prompt_wav is None:
        raise ApiError(400, "give the voice to clone: reference_audio (base64) or reference_audio_file")
    audio_format, stream = read_options(fields)
    text = fields.text("text", required=True, limit=state.settings.limits.max_text_chars)
    voice = VoiceReference(recordings=(Recording(prompt_wav, "reference_audio"),),
                           transcript=fields.text("reference_text", limit=state.settings.limits.max_text_chars))
    return SpeechRequest(text=text, voice=voice), audio_format, stream


async def answer(request: Request, read: Callable[[Request, ServiceState], Awaitable[tuple[SpeechRequest, str, bool]]]
                 ) -> Response:
    """Read the request with `read`, synthesize it on the configured backend, answer with a file or a stream."""
    speech: SpeechService = request.app.state.speech

    async def respond(record: RequestRecord, headers: dict[str, str]) -> Response:
        body, audio_format, stream = await read(request, speech.state)
        started = await speech.start(body, record)
        return await audio_response(request, started, record, audio_format, headers, stream)

    return await speech_response(speech, respond)


async def speak(request: Request) -> Response:
    return await answer(request, read_speak)


async def clone_voice(request: Request) -> Response:
    return await answer(request, read_clone)


async def add_speaker(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    engine = state.ready_engine()
    limit, part_limit = _form_limits(state)
    async with read_form(request, ADD_FIELDS, limit, max_files=2, part_limit=part_limit) as fields:
        name = fields.text("name", required=True)
        validate_speaker_id(name)
        data = await voice_audio(fields, "audio", "audio_file", state.settings.limits.max_upload_bytes)
        filename = getattr(fields.get("audio_file", None), "filename", None) or ""
    if data is None:
        raise ApiError(400, "give the speaker's recording: audio_file (upload) or audio (base64)")
    await state.add_speaker(engine, name, data, fields.text("reference_text"), "audio",
                            {"source_file": filename, "added_via": "/add_speaker"},
                            taken=f"role {quote(name)} already exists")
    return JSONResponse({"success": True, "role": name})


async def delete_speaker(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    async with read_form(request, ("name",), 64 * 1024, max_files=0) as fields:
        name = fields.text("name", required=True)
    await state.remove_speaker(name, f"role {quote(name)} not found")
    return JSONResponse({"success": True, "role": name})


async def audio_roles(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    return JSONResponse({"success": True, "roles": state.speakers.ids()})


async def server_info(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    engine = state.ready_engine()
    return JSONResponse({"model": engine.info.model_type, "roles": state.speakers.ids(),
                         "sample_rate": engine.info.sample_rate})


routes = [
    Route("/speak", speak, methods=["POST"]),
    Route("/clone_voice", clone_voice, methods=["POST"]),
    Route("/add_speaker", add_speaker, methods=["POST"]),
    Route("/delete_speaker", delete_speaker, methods=["POST"]),
    Route("/audio_roles", audio_roles, methods=["GET"]),
    Route("/server_info", server_info, methods=["GET"]),
]
