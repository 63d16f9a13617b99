"""POST /synthesize: the seed's streaming endpoint.

Form fields (multipart/form-data, or application/x-www-form-urlencoded when no file is sent):
    text (required), instruction, prompt_text, prompt_wav (file), speaker (a registered id), format (pcm|wav),
    fixed_length (benchmarking aid: generate exactly N LM tokens per sentence, ignoring the stop token, so
    load tests on random weights produce comparable amounts of audio),
    backend (one of the loaded backends, e.g. fish; default: [model] backend)
Mode (docs/ARCHITECTURE.md): instruction -> instruct2; else prompt_text -> zero_shot; else a speaker ->
zero_shot with its stored transcript (cross_lingual when it has none); else prompt_wav -> cross_lingual;
else the configured default instruction (instruct2) with the default prompt voice.

Everything that can be checked is checked before the first byte, including the first chunk of audio: the
answer is then either a 4xx/5xx JSON `{"detail": ...}` or a 200 whose body is raw PCM s16le mono at the
backend's rate, streamed as the backend produces it. One log line per request.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cosyapp.audio import wav_header
from cosyapp.config import LimitsSettings
from cosyapp.engine.scheduler import Engine, SynthesisStream
from cosyapp.engine.types import Mode, SynthesisRequest, Voice
from cosyapp.server.audio_responses import RequestRecord, rejected, streamed_response
from cosyapp.server.bodies import limited_request, media_type
from cosyapp.server.errors import ApiError, error_response
from cosyapp.server.state import ServiceState

FIELDS = ("text", "instruction", "prompt_text", "prompt_wav", "speaker", "format", "fixed_length", "backend")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
FORMATS = {"pcm": "application/octet-stream", "wav": "audio/wav"}
END_OF_PROMPT = "<|endofprompt|>"
# Room for the text fields and multipart framing on top of the largest allowed upload.
FIELDS_ALLOWANCE = 256 * 1024
FIELD_PART_LIMIT = 64 * 1024
# Largest fixed_length: the LM's default context per stream (the backend refuses what does not fit its room).
MAX_FIXED_LENGTH = 4096


@dataclass(frozen=True)
class SynthesisForm:
    text: str
    instruction: str | None
    prompt_text: str | None
    prompt_wav: bytes | None
    speaker: str | None
    format: str
    fixed_length: int | None = None
    backend: str | None = None


async def read_form(request: Request, limits: LimitsSettings) -> SynthesisForm:
    content_type = media_type(request)
    if content_type not in FORM_TYPES:
        raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
                            "(or application/x-www-form-urlencoded) with at least a 'text' field")
    limited = limited_request(request, limits.max_upload_bytes + FIELDS_ALLOWANCE)
    form = await limited.form(max_files=1, max_fields=2 * len(FIELDS), max_part_size=FIELD_PART_LIMIT)
    try:
        return await _parse_form(form, limits)
    finally:
        await form.close()


def _one(form: FormData, name: str) -> str | UploadFile | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"field {name!r} was given {len(values)} times")
    return values[0] if values else None


def _text_field(form: FormData, name: str, limits: LimitsSettings) -> str | None:
    value = _one(form, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"field {name!r} must be a plain form field, not a file")
    value = value.strip()
    if len(value) > limits.max_text_chars:
        raise ApiError(400, f"{name} is too long: {len(value)} characters, the limit is {limits.max_text_chars}")
    return value or None


def _fixed_length_field(form: FormData, limits: LimitsSettings) -> int | None:
    value = _text_field(form, "fixed_length", limits)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 6 and 1 <= int(value) <= MAX_FIXED_LENGTH):
        raise ApiError(400, f"fixed_length must be a whole number of LM tokens from 1 to {MAX_FIXED_LENGTH}; "
                            f"got {value[:40]!r}")
    return int(value)


async def _parse_form(form: FormData, limits: LimitsSettings) -> SynthesisForm:
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; accepted fields: {', '.join(FIELDS)}")
    if _one(form, "text") is None:
        raise ApiError(400, "missing required field 'text'")
    text = _text_field(form, "text", limits)
    if text is None:
        raise ApiError(400, "text is empty")
    upload = _one(form, "prompt_wav")
    prompt_wav = None
    if isinstance(upload, str):
        raise ApiError(400, "prompt_wav must be a file upload (curl: -F prompt_wav=@voice.wav)")
    if isinstance(upload, UploadFile):
        prompt_wav = await upload.read()
        if len(prompt_wav) > limits.max_upload_bytes:
            raise ApiError(413, f"prompt_wav is too large: {len(prompt_wav) / 2**20:.1f} MiB, "
                                f"the limit is {limits.max_upload_mb:g} MiB")
        if not prompt_wav:
            raise ApiError(400, "prompt_wav is empty")
    speaker = _text_field(form, "speaker", limits)
    if speaker is not None and prompt_wav is not None:
        raise ApiError(400, "give either 'speaker' or 'prompt_wav', not both")
    audio_format = (_text_field(form, "format", limits) or "pcm").lower()
    if audio_format not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}; got {audio_format!r}")
    return SynthesisForm(text=text, instruction=_text_field(form, "instruction", limits),
                         prompt_text=_text_field(form, "prompt_text", limits), prompt_wav=prompt_wav,
                         speaker=speaker, format=audio_format, fixed_length=_fixed_length_field(form, limits),
                         backend=_text_field(form, "backend", limits))


def choose_mode(form: SynthesisForm, speaker_text: str | None, default_instruction: str
                ) -> tuple[Mode, str | None, str | None]:
    """(mode, instruction, prompt_text) by the rules in the module docstring."""
    if form.instruction:
        instruction = form.instruction if form.instruction.endswith(END_OF_PROMPT) else form.instruction + END_OF_PROMPT
        return Mode.INSTRUCT2, instruction, None
    if form.prompt_text:
        return Mode.ZERO_SHOT, None, form.prompt_text
    if form.speaker:
        return (Mode.ZERO_SHOT, None, speaker_text) if speaker_text else (Mode.CROSS_LINGUAL, None, None)
    if form.prompt_wav is None and default_instruction:
        return Mode.INSTRUCT2, default_instruction, None
    return Mode.CROSS_LINGUAL, None, None


async def voice_and_mode(state: ServiceState, form: SynthesisForm, engine: Engine
                         ) -> tuple[Voice, Mode, str | None, str | None]:
    if form.instruction and Mode.INSTRUCT2.value not in engine.info.modes:
        raise ApiError(400, f"the {engine.info.model_type} model takes no 'instruction' (no instruct2 mode); "
                            "send prompt_wav with prompt_text, or a speaker, to choose the voice")
    speaker_text = None
    if form.speaker is not None:
        voice, stored = await state.speaker_voice(engine, form.speaker)
        speaker_text = stored.text
    elif form.prompt_wav is not None:
        voice = await state.upload_voice(engine, form.prompt_wav)
    else:
        voice = await state.default_voice(engine)
    mode, instruction, prompt_text = choose_mode(form, speaker_text, state.default_instruction(engine))
    if mode.value not in engine.info.modes:
        raise ApiError(400, f"the {engine.info.model_type} model does not support the {mode.value} mode; "
                            f"supported: {', '.join(engine.info.modes)}")
    if mode is Mode.ZERO_SHOT:
        voice = replace(voice, text=prompt_text)
    return voice, mode, instruction, prompt_text


async def start_stream(state: ServiceState, engine: Engine, form: SynthesisForm, record: RequestRecord
                       ) -> tuple[SynthesisStream, np.ndarray]:
    """Admit the request, choose its voice and mode, start it and wait for its first chunk, so that every error
    up to the first audio is still answered with an error status. The caller owns the stream from here."""
    record.text_chars = len(form.text)
    record.sample_rate = engine.info.sample_rate
    admission = engine.admit()
    try:
        voice, mode, instruction, prompt_text = await voice_and_mode(state, form, engine)
        record.mode = mode.value
        synthesis = SynthesisRequest(text=form.text, voice=voice, mode=mode, instruction=instruction,
                                     prompt_text=prompt_text, fixed_length=form.fixed_length)
        stream = await engine.start(synthesis, admission)
    except BaseException:
        admission.release()  # start() never ran or failed: give the place back
        raise
    try:
        first_chunk = await anext(stream, None)  # backend errors up to here still become a 4xx
        if first_chunk is None:
            raise ApiError(400, "the text produced no audio (is there anything speakable in it?)")
    except BaseException:
        stream.cancel()
        raise
    record.ttfb_s = time.perf_counter() - record.started
    record.audio_samples += first_chunk.shape[0]
    return stream, first_chunk


async def synthesize(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    record = RequestRecord(uuid.uuid4().hex[:12])
    headers = {"X-Request-Id": record.id}
    try:
        engine = state.ready_engine()
        form = await read_form(request, state.settings.limits)
        if form.backend is not None:
            engine = state.ready_engine(form.backend)
        stream, first_chunk = await start_stream(state, engine, form, record)
    except Exception as e:
        return error_response(rejected(e, record, headers))

    header = wav_header(record.sample_rate) if form.format == "wav" else b""
    return streamed_response(stream, first_chunk, record, FORMATS[form.format], headers, header)


routes = [Route("/synthesize", synthesize, methods=["POST"])]
