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

import asyncio
import uuid
from typing import Any, Awaitable, Callable

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import AUDIO_MEDIA_TYPES, wav_header
from cosyapp.server.audio_responses import RequestRecord, file_response, rejected, streamed_response
from cosyapp.server.bodies import audio_bytes, base64_size, limited_request, media_type, read_json_object
from cosyapp.server.errors import ApiError, error_response
from cosyapp.server.routes.synthesize import FIELD_PART_LIMIT, SynthesisForm, start_stream
from cosyapp.server.state import ServiceState
from cosyapp.voices import validate_speaker_id

LEVELS = ("very_low", "low", "moderate", "high", "very_high")
STREAMED_FORMATS = ("wav", "pcm")
OPTION_FIELDS = ("pitch", "speed", "temperature", "top_k", "top_p", "max_tokens", "length_threshold",
                 "window_size", "stream", "response_format")
SPEAK_FIELDS = ("name", "text", *OPTION_FIELDS)
CLONE_FIELDS = ("text", "reference_audio", "reference_audio_file", "reference_text", "latent_file", *OPTION_FIELDS)
ADD_FIELDS = ("name", "audio", "audio_file", "reference_text", "latent_file")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class FlashFields:
    """Request fields from JSON (typed) or a form (strings), read with Flash-TTS's defaults; every problem is a
    400 naming the field, unknown fields included."""

    def __init__(self, values: dict[str, Any], accepted: tuple[str, ...]) -> None:
        unknown = sorted(str(name) for name in values if name not in accepted)
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        self.values = values

    def text(self, name: str, required: bool = False) -> str | None:
        value = self.values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise ApiError(400, f"{name} is missing or empty")
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be text")
        return value.strip()

    def number(self, name: str, low: float, high: float, whole: bool = False) -> float | None:
        value = self.values.get(name)
        if value is None:
            return None
        try:
            if isinstance(value, bool) or (whole and isinstance(value, float)):
                raise ValueError
            number = int(value) if whole else float(value)
        except (TypeError, ValueError):
            raise ApiError(400, f"{name} must be a{' whole' if whole else ''} number; got {value!r}") from None
        if not low <= number <= high:
            raise ApiError(400, f"{name} must be from {low:g} to {high:g}; got {number!r}")
        return number

    def flag(self, name: str) -> bool:
        value = self.values.get(name, False)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*TRUE, *FALSE):
            return value.strip().lower() in TRUE
        raise ApiError(400, f"{name} must be true or false; got {value!r}")


def read_options(fields: FlashFields) -> tuple[str, bool]:
    """The options /speak and /clone_voice share, checked -> (response_format, stream)."""
    for name in ("pitch", "speed"):
        level = fields.text(name) or "moderate"
        if level not in LEVELS:
            raise ApiError(400, f"{name} must be one of {', '.join(LEVELS)}; got {level!r}")
        if level != "moderate":
            raise ApiError(400, f"{name} {level} is not supported: the model speaks at its own {name} (moderate)")
    fields.number("temperature", 0.0, 100.0)
    fields.number("top_p", 0.0, 1.0)
    for name in ("top_k", "max_tokens", "length_threshold", "window_size"):
        fields.number(name, 1, 1_000_000, whole=True)
    audio_format = (fields.text("response_format") or "mp3").lower()
    if audio_format not in AUDIO_MEDIA_TYPES:
        raise ApiError(400, f"response_format must be one of {', '.join(AUDIO_MEDIA_TYPES)}; got {audio_format!r}")
    stream = fields.flag("stream")
    if stream and audio_format not in STREAMED_FORMATS:
        raise ApiError(400, f"stream: true sends {' or '.join(STREAMED_FORMATS)}; got response_format {audio_format}")
    return audio_format, stream


async def read_form_fields(request: Request, limit: int, accepted: tuple[str, ...],
                           part_limit: int) -> tuple[FlashFields, FormData]:
    """The form's fields (the caller closes the form: its files stay readable until then)."""
    if media_type(request) not in FORM_TYPES:
        raise ApiError(415, "send the fields as multipart/form-data or application/x-www-form-urlencoded")
    form = await limited_request(request, limit).form(max_files=2, max_fields=2 * len(accepted),
                                                      max_part_size=part_limit)
    repeated = sorted({name for name in form.keys() if len(form.getlist(name)) > 1})
    if repeated:
        await form.close()
        raise ApiError(400, f"field(s) given more than once: {', '.join(repeated)}")
    try:
        return FlashFields(dict(form), accepted), form
    except ApiError:
        await form.close()
        raise


async def voice_audio(fields: FlashFields, text_name: str, file_name: str, max_bytes: int) -> bytes | None:
    """The voice recording of a form: an uploaded file, or base64 text (not a URL: nothing is fetched)."""
    if fields.values.get("latent_file") is not None:
        raise ApiError(400, "latent_file is for MegaTTS3 voices; this model needs only the recording")
    upload, encoded = fields.values.get(file_name), fields.values.get(text_name)
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


async def read_speak(request: Request, state: ServiceState) -> tuple[SynthesisForm, bool]:
    body = await read_json_object(request, 4 * state.settings.limits.max_text_chars + 16 * 1024)
    fields = FlashFields(body, SPEAK_FIELDS)
    name = fields.text("name", required=True)
    audio_format, stream = read_options(fields)
    return SynthesisForm(text=_text(fields, state), instruction=None, prompt_text=None, prompt_wav=None,
                         speaker=name, format=audio_format), stream


async def read_clone(request: Request, state: ServiceState) -> tuple[SynthesisForm, bool]:
    max_bytes = state.settings.limits.max_upload_bytes
    fields, form_data = await read_form_fields(request, 2 * base64_size(max_bytes), CLONE_FIELDS,
                                               base64_size(max_bytes))
    try:
        prompt_wav = await voice_audio(fields, "reference_audio", "reference_audio_file", max_bytes)
    finally:
        await form_data.close()
    if prompt_wav is None:
        raise ApiError(400, "give the voice to clone: reference_audio (base64) or reference_audio_file")
    audio_format, stream = read_options(fields)
    return SynthesisForm(text=_text(fields, state), instruction=None, prompt_text=fields.text("reference_text"),
                         prompt_wav=prompt_wav, speaker=None, format=audio_format), stream


async def answer(request: Request, read: Callable[[Request, ServiceState], Awaitable[tuple[SynthesisForm, bool]]]
                 ) -> Response:
    """Read the request with `read`, synthesize it on the configured backend, answer with a file or a stream."""
    state: ServiceState = request.app.state.service
    record = RequestRecord(uuid.uuid4().hex[:12])
    headers = {"X-Request-Id": record.id}
    try:
        form, stream_answer = await read(request, state)
        stream, first_chunk = await start_stream(state, state.ready_engine(), form, record)
    except Exception as e:
        return error_response(rejected(e, record, headers))
    if stream_answer:
        header = wav_header(record.sample_rate) if form.format == "wav" else b""
        return streamed_response(stream, first_chunk, record, AUDIO_MEDIA_TYPES[form.format], headers, header)
    try:
        return await file_response(request, stream, first_chunk, record, form.format, headers)
    except Exception as e:
        return error_response(rejected(e, record, headers))


async def speak(request: Request) -> Response:
    return await answer(request, read_speak)


async def clone_voice(request: Request) -> Response:
    return await answer(request, read_clone)


def _text(fields: FlashFields, state: ServiceState) -> str:
    text = fields.text("text", required=True)
    limit = state.settings.limits.max_text_chars
    if len(text) > limit:
        raise ApiError(400, f"text is too long: {len(text)} characters, the limit is {limit}")
    return text


async def add_speaker(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    engine = state.ready_engine()
    max_bytes = state.settings.limits.max_upload_bytes
    fields, form_data = await read_form_fields(request, 2 * base64_size(max_bytes), ADD_FIELDS,
                                               base64_size(max_bytes))
    try:
        name = fields.text("name", required=True)
        validate_speaker_id(name)
        data = await voice_audio(fields, "audio", "audio_file", max_bytes)
        filename = getattr(fields.values.get("audio_file"), "filename", None) or ""
    finally:
        await form_data.close()
    if data is None:
        raise ApiError(400, "give the speaker's recording: audio_file (upload) or audio (base64)")
    await state.add_speaker(engine, name, data, fields.text("reference_text"), "audio",
                            {"source_file": filename, "added_via": "/add_speaker"},
                            taken=f"role {name!r} already exists")
    return JSONResponse({"success": True, "role": name})


async def delete_speaker(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    fields, form_data = await read_form_fields(request, 64 * 1024, ("name",), FIELD_PART_LIMIT)
    await form_data.close()
    name = fields.text("name", required=True)
    validate_speaker_id(name)
    if name not in state.speakers.ids():
        raise ApiError(404, f"role {name!r} not found; roles: {', '.join(state.speakers.ids()) or 'none'}")
    await asyncio.to_thread(state.speakers.remove, name)
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
