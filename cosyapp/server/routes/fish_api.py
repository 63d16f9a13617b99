"""The Fish Speech HTTP API (seed 001) on the Fish engine: a thin adapter, like /synthesize.

    GET|POST /v1/health                     {"status": "ok"} (no API key needed)
    POST /v1/tts                            ServeTTSRequest -> audio (wav, pcm, mp3, opus, flac; wav/pcm streamed)
    POST /v1/vqgan/encode                   {"audios": [bytes]} -> {"tokens": [[10][T] ints]}
    POST /v1/vqgan/decode                   {"tokens": [[10][T] ints]} -> {"audios": [float16 PCM bytes]}
    POST /v1/references/add                 multipart id, audio (file), text -> stored in the speaker registry
    GET  /v1/references/list, DELETE /v1/references/delete, POST /v1/references/update
    POST /generate_audio_enhanced_async     AsyncGenerateRequest -> a task (`fish_tasks.py`)
    GET  /get_task_status/{step_id}, GET /download_result/{step_id}
    POST /stop_generation, POST /stop_async_task/{step_id}
    WebSocket /v1/tts/live                  Fish's live text-in, audio-out protocol (`fish_live.py`)

Bodies are application/msgpack (ormsgpack) or application/json; bytes fields (audio) are msgpack binary or
base64 strings. Answers are JSON unless the client asks for msgpack (`?format=msgpack`, or an Accept header
naming application/msgpack and not application/json): upstream defaulted to msgpack, but the seed's examples
read the reference and stop answers with `response.json()` without asking. In JSON answers bytes are base64.
Errors are `{"detail": "..."}` with the seed's status codes.

Where this differs from upstream's S1 server (docs/research/fish.md 0, 5), on purpose:
* an unknown `reference_id` is a 404 (upstream synthesized a random voice);
* non-streaming `pcm` works (upstream: 500), `opus` and `flac` are added, streaming takes `wav` and `pcm`;
* streaming sends audio while it is generated (incremental codec decode; upstream: one chunk at the end), and a
  `wav` stream starts with a WAV header unless `[fishapi] wav_stream_header = false` (upstream's headerless PCM);
* `/v1/vqgan/decode` works (broken at upstream HEAD); the async task endpoints exist (they never did upstream);
* the API key is checked in constant time and not on /v1/health.
`chunk_length` and `normalize` are validated but have no effect (S1 neither chunks nor normalises text);
`use_memory_cache` has no effect either: prepared references are always cached (by content hash, and by
reference id + version), which changes no output.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import ormsgpack
import torch
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from cosyapp.audio import AUDIO_MEDIA_TYPES, check_duration, decode_audio, encode_audio, wav_header
from cosyapp.engine.scheduler import Admission, Engine, SynthesisStream
from cosyapp.engine.types import InputError, Mode, SynthesisRequest, Voice
from cosyapp.server.audio_responses import RequestRecord, file_response, streamed_response
from cosyapp.server.bodies import audio_bytes, limited_request, media_type
from cosyapp.server.errors import ApiError, as_api_error
from cosyapp.server.fish_tasks import COMPLETED, STEP_ID, Job, Task, TaskConflict, TaskManager
from cosyapp.server.state import ServiceState
from cosyapp.voices import StoredVoice, validate_speaker_id

FISH = "fish"
NOT_SERVED = ("this service does not run the Fish backend: set [model] backend = \"fish\" (or extra_backend = "
              "\"fish\") in config.toml")
NO_AUDIO = "No audio generated, please check the input text"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
JSON_TYPE = "application/json"
STREAM_FORMATS = ("wav", "pcm")
# Inline audio per request (references, vqgan audios); bodies are capped accordingly (base64 adds a third).
MAX_INLINE_AUDIOS = 4
BODY_ALLOWANCE = 1 << 20
FORM_PART_LIMIT = 64 * 1024
# Longest code sequence /v1/vqgan/decode takes (~6 min of audio at 21.5 frames/s).
MAX_DECODE_FRAMES = 8192
# The seed's rule for reference ids; the speaker registry then applies its own (stricter) one.
REFERENCE_ID = re.compile(r"[A-Za-z0-9\-_ ]{1,255}")

TTS_FIELDS = ("text", "chunk_length", "format", "latency", "references", "reference_id", "seed", "use_memory_cache",
              "normalize", "streaming", "max_new_tokens", "top_p", "repetition_penalty", "temperature")
ASYNC_FIELDS = ("step_id", *(name for name in TTS_FIELDS if name != "streaming"))


# ----------------------------------------------------------------------------------------- wire format


def body_limit(state: ServiceState) -> int:
    return MAX_INLINE_AUDIOS * (state.settings.limits.max_upload_bytes * 4 // 3 + 4) + BODY_ALLOWANCE


async def read_payload(request: Request, limit: int) -> Any:
    """The request body decoded from msgpack or JSON (by Content-Type); 413 past `limit` bytes."""
    content_type = media_type(request)
    if content_type not in (*MSGPACK_TYPES, JSON_TYPE):
        raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}: send application/msgpack or "
                            "application/json")
    body = await limited_request(request, limit).body()
    if not body:
        raise ApiError(400, "the request body is empty")
    try:
        return ormsgpack.unpackb(body) if content_type in MSGPACK_TYPES else json.loads(body)
    except (ormsgpack.MsgpackDecodeError, ValueError) as e:
        kind = "msgpack" if content_type in MSGPACK_TYPES else "JSON"
        raise ApiError(400, f"the request body is not valid {kind}: {e}") from None


def wants_msgpack(request: Request) -> bool:
    """`?format=json|msgpack` decides; else an Accept header naming msgpack and not JSON; else JSON."""
    query = request.query_params.get("format")
    if query is not None:
        if query not in ("json", "msgpack"):
            raise ApiError(400, f"the format query parameter must be json or msgpack; got {query!r}")
        return query == "msgpack"
    accept = request.headers.get("accept", "").lower()
    return any(t in accept for t in MSGPACK_TYPES) and JSON_TYPE not in accept


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def reply(request: Request, body: dict[str, Any], status_code: int = 200) -> Response:
    if wants_msgpack(request):
        return Response(ormsgpack.packb(body), status_code=status_code, media_type=MSGPACK_TYPES[0])
    return JSONResponse(_jsonable(body), status_code=status_code)


_MISSING = object()


class Fields:
    """A decoded request body read field by field, with upstream's defaults; every problem is a 400 naming the
    field. Unknown fields are refused (a typo must not silently fall back to a default)."""

    def __init__(self, payload: Any, accepted: Iterable[str]) -> None:
        accepted = tuple(accepted)
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be an object (a map) of fields")
        unknown = sorted(str(key) for key in payload if key not in accepted)
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        self.payload = payload

    def get(self, name: str, default: Any = _MISSING, nullable: bool = False) -> Any:
        if name not in self.payload:
            if default is _MISSING:
                raise ApiError(400, f"missing required field {name!r}")
            return default
        value = self.payload[name]
        if value is None and not nullable:
            raise ApiError(400, f"{name} must not be null")
        return value

    def string(self, name: str, default: Any = _MISSING, nullable: bool = False) -> str | None:
        value = self.get(name, default, nullable)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
        return value

    def integer(self, name: str, default: Any, low: int | None = None, high: int | None = None,
                nullable: bool = False) -> int | None:
        value = self.get(name, default, nullable)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"{name} must be an integer; got {value!r}")
        self._check_range(name, value, low, high)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise ApiError(400, f"{name} must be a number; got {value!r}")
        self._check_range(name, value, low, high)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(400, f"{name} must be true or false; got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        value = self.get(name, default)
        if value not in choices:
            raise ApiError(400, f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value

    @staticmethod
    def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ApiError(400, f"{name} must be {bounds}; got {value!r}")


def _audio_list(fields: Fields, name: str, max_bytes: int) -> list[bytes]:
    values = fields.get(name)
    if not isinstance(values, list) or not values:
        raise ApiError(400, f"{name} must be a non-empty list of audio files")
    if len(values) > MAX_INLINE_AUDIOS:
        raise ApiError(400, f"{name}: at most {MAX_INLINE_AUDIOS} audio files per request; got {len(values)}")
    return [audio_bytes(value, f"{name}[{i}]", max_bytes) for i, value in enumerate(values)]


# -------------------------------------------------------------------------------------- ServeTTSRequest


@dataclass(frozen=True)
class InlineReference:
    audio: bytes
    text: str


@dataclass(frozen=True)
class TTSParams:
    text: str
    format: str
    references: tuple[InlineReference, ...]
    reference_id: str | None
    seed: int | None
    streaming: bool
    options: dict[str, Any]  # the Fish backend's request options


def _references(fields: Fields, max_bytes: int) -> tuple[InlineReference, ...]:
    values = fields.get("references", [])
    if not isinstance(values, list):
        raise ApiError(400, "references must be a list of {audio, text} objects")
    if len(values) > MAX_INLINE_AUDIOS:
        raise ApiError(400, f"references: at most {MAX_INLINE_AUDIOS} per request; got {len(values)}")
    references = []
    for i, value in enumerate(values):
        item = Fields(value, ("audio", "text"))
        references.append(InlineReference(audio=audio_bytes(item.get("audio"), f"references[{i}].audio", max_bytes),
                                          text=item.string("text") or ""))
    return tuple(references)


def parse_tts(fields: Fields, max_text_length: int, max_upload_bytes: int, default_format: str = "wav",
              default_max_new_tokens: int = 1024, text_required: bool = True) -> TTSParams:
    """ServeTTSRequest (and AsyncGenerateRequest, with its defaults) with the seed's defaults and ranges. A live
    session's request (`text_required=False`) may have no text: its text comes in events."""
    text = fields.string("text") if text_required else fields.string("text", "")
    if text_required and not text.strip():
        raise ApiError(400, "text is empty")
    if max_text_length > 0 and len(text) > max_text_length:
        raise ApiError(400, f"Text is too long, max length is {max_text_length}")
    options = {
        "chunk_length": fields.integer("chunk_length", 200, 100, 300),
        "max_new_tokens": fields.integer("max_new_tokens", default_max_new_tokens, 0),
        "top_p": fields.number("top_p", 0.8, 0.1, 1.0),
        "repetition_penalty": fields.number("repetition_penalty", 1.1, 0.9, 2.0),
        "temperature": fields.number("temperature", 0.8, 0.1, 1.0),
    }
    fields.choice("use_memory_cache", "off", ("on", "off"))
    fields.choice("latency", "normal", ("normal", "balanced"))  # newer clients send it; no effect
    fields.boolean("normalize", True)
    reference_id = fields.string("reference_id", None, nullable=True)
    if reference_id is not None:
        check_reference_id(reference_id, "reference_id")
    return TTSParams(text=text, format=fields.choice("format", default_format, AUDIO_MEDIA_TYPES),
                     references=_references(fields, max_upload_bytes), reference_id=reference_id,
                     seed=fields.integer("seed", None, nullable=True),
                     streaming=fields.boolean("streaming", False), options=options)


# ------------------------------------------------------------------------------------------------ voices


def fish_engine(state: ServiceState) -> Engine:
    """The Fish engine, a 503 while it loads, or a 503 saying the service does not run it."""
    if FISH not in state.backends:
        raise ApiError(503, NOT_SERVED)
    return state.ready_engine(FISH)


def check_reference_id(reference_id: str, field: str) -> None:
    """400 unless the id passes the seed's rule and the speaker registry's (letters, digits, '-', '_', at most 64
    characters, starting with a letter or digit: references are stored as registry folders)."""
    if not REFERENCE_ID.fullmatch(reference_id):
        raise ApiError(400, f"{field}: invalid reference id {reference_id!r}: use 1-255 letters, digits, '-', '_' "
                            "or spaces")
    try:
        validate_speaker_id(reference_id)
    except InputError as e:
        raise ApiError(400, f"{field}: {e} (references are stored in the speaker registry)") from None


def stored_reference(state: ServiceState, reference_id: str, field: str = "reference_id") -> StoredVoice:
    """A registered reference voice: 400 for an invalid id, 404 for an unknown one."""
    check_reference_id(reference_id, field)
    if reference_id not in state.speakers.ids():
        raise ApiError(404, f"Reference voice '{reference_id}' not found")
    return state.speakers.get(reference_id)


async def _encoded_voice(state: ServiceState, engine: Engine, data: bytes, what: str, check_length: bool) -> Voice:
    """Codec codes of an uploaded recording, cached by content hash (separately with and without the prompt
    length limits, so an unchecked vqgan upload never stands in for a checked reference)."""
    limits = state.settings.limits

    def prepare() -> Voice:
        samples, sample_rate = decode_audio(data, what)
        if check_length:
            check_duration(samples, sample_rate, limits.min_prompt_s, limits.max_prompt_s, what)
        return engine.backend.prepare_voice(samples, sample_rate, None)

    digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return await engine.voice(f"{'fish-ref' if check_length else 'vqgan'}:{digest}", prepare)


async def fish_voice(state: ServiceState, engine: Engine, params: TTSParams) -> tuple[Voice, Mode]:
    """`reference_id` (it wins, as upstream), else the inline references, else no reference (the model picks)."""
    backend = engine.backend
    if params.reference_id is not None:
        stored_reference(state, params.reference_id)
        voice, stored = await state.speaker_voice(engine, params.reference_id)
        return voice, Mode.ZERO_SHOT if stored.text else Mode.CROSS_LINGUAL
    if not params.references:
        return backend.no_reference_voice(), Mode.ZERO_SHOT
    codes = []
    for i, reference in enumerate(params.references):
        voice = await _encoded_voice(state, engine, reference.audio, f"references[{i}].audio", check_length=True)
        codes.extend(backend.voice_state(voice)["codes"])
    texts = [reference.text for reference in params.references]
    return backend.voice_from_state({"codes": codes, "texts": texts}, None), Mode.ZERO_SHOT


async def start_synthesis(state: ServiceState, engine: Engine, params: TTSParams, stream: bool,
                          admission: Admission) -> SynthesisStream:
    """Prepare the voice and start generating; releases `admission` when it fails before the stream owns it."""
    try:
        voice, mode = await fish_voice(state, engine, params)
        request = SynthesisRequest(text=params.text, voice=voice, mode=mode, stream=stream, seed=params.seed,
                                   options=params.options)
        return await engine.start(request, admission)
    except BaseException:
        admission.release()
        raise


# ------------------------------------------------------------------------------------------- /v1/health


async def health(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    if FISH not in state.backends:
        return JSONResponse({"status": "error", "detail": NOT_SERVED}, status_code=503)
    if state.status == "ok":
        return JSONResponse({"status": "ok"})
    body = {"status": state.status}
    if state.error:
        body["detail"] = state.error
    return JSONResponse(body, status_code=503)


# ---------------------------------------------------------------------------------------------- /v1/tts


async def tts(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    record = RequestRecord(uuid.uuid4().hex[:12])
    record.mode = "fish_tts"
    stream: SynthesisStream | None = None
    try:
        engine = fish_engine(state)
        fields = Fields(await read_payload(request, body_limit(state)), TTS_FIELDS)
        params = parse_tts(fields, state.settings.fishapi.max_text_length, state.settings.limits.max_upload_bytes)
        if params.streaming and params.format not in STREAM_FORMATS:
            raise ApiError(400, f"Streaming only supports the {' and '.join(STREAM_FORMATS)} formats; "
                                f"got {params.format!r}")
        record.text_chars = len(params.text)
        record.sample_rate = engine.info.sample_rate
        stream = await start_synthesis(state, engine, params, params.streaming, engine.admit())
        headers = {"Content-Disposition": f"attachment; filename=audio.{params.format}", "X-Request-Id": record.id}
        media_type = AUDIO_MEDIA_TYPES[params.format]
        first = await anext(stream, None)  # errors up to the first audio still become a 4xx
        if first is None:
            raise ApiError(400, NO_AUDIO)
        if not params.streaming:
            return await file_response(request, stream, first, record, params.format, headers)
        record.ttfb_s = time.perf_counter() - record.started
        record.audio_samples += first.shape[0]
        header = wav_header(record.sample_rate) if params.format == "wav" and \
            state.settings.fishapi.wav_stream_header else b""
        return streamed_response(stream, first, record, media_type, headers, header)
    except BaseException as e:
        if stream is not None:
            stream.cancel()
        error = as_api_error(e) if isinstance(e, Exception) else None
        record.finish(error.status_code if error else 500, f"rejected({error.detail})" if error else
                      f"error({type(e).__name__})")
        raise


# ------------------------------------------------------------------------------------------ /v1/vqgan/*


async def vqgan_encode(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    engine = fish_engine(state)
    fields = Fields(await read_payload(request, body_limit(state)), ("audios",))
    audios = _audio_list(fields, "audios", state.settings.limits.max_upload_bytes)
    tokens = []
    for i, data in enumerate(audios):
        voice = await _encoded_voice(state, engine, data, f"audios[{i}]", check_length=False)
        (codes,) = engine.backend.voice_state(voice)["codes"]
        tokens.append(codes.tolist())
    return reply(request, {"tokens": tokens})


def _codes(value: Any, what: str, n_codebooks: int) -> torch.Tensor:
    if not isinstance(value, list) or len(value) != n_codebooks or not all(isinstance(r, list) for r in value):
        raise ApiError(400, f"{what} must be {n_codebooks} lists of codes (one per codebook)")
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value):
        raise ApiError(400, f"{what}: every codebook row needs the same, non-zero number of codes")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 or c >= 2**31 for row in value for c in row):
        raise ApiError(400, f"{what}: codes must be non-negative integers")
    return torch.tensor(value, dtype=torch.long)


def _decode(engine: Engine, codes: torch.Tensor) -> bytes:
    backend = engine.backend
    audio = backend.codec.decode(codes[None].to(backend.device))[0, 0]
    return audio.float().cpu().numpy().astype(np.float16).tobytes()


async def vqgan_decode(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    engine = fish_engine(state)
    fields = Fields(await read_payload(request, body_limit(state)), ("tokens",))
    values = fields.get("tokens")
    if not isinstance(values, list) or not values:
        raise ApiError(400, "tokens must be a non-empty list of code grids [codebooks][frames]")
    n_codebooks = engine.backend.model.config.num_codebooks
    grids = [_codes(value, f"tokens[{i}]", n_codebooks) for i, value in enumerate(values)]
    frames = sum(grid.shape[1] for grid in grids)
    if frames > MAX_DECODE_FRAMES:
        raise ApiError(400, f"tokens: at most {MAX_DECODE_FRAMES} frames per request; got {frames}")
    admission = engine.admit()  # bounds concurrent codec work like synthesis (503 when busy)
    try:
        audios = [await asyncio.to_thread(_decode, engine, grid) for grid in grids]
    finally:
        admission.release()
    return reply(request, {"audios": audios})


# ------------------------------------------------------------------------------------- /v1/references/*


async def _read_add_form(request: Request, state: ServiceState) -> tuple[Any, Any, Any, str | None]:
    """(id, text, audio bytes, file name) from multipart (the seed) or from a msgpack/JSON body."""
    max_bytes = state.settings.limits.max_upload_bytes
    if media_type(request) != "multipart/form-data":
        fields = Fields(await read_payload(request, body_limit(state)), ("id", "audio", "text"))
        return fields.get("id"), fields.get("text"), audio_bytes(fields.get("audio"), "audio", max_bytes), None
    limit = max_bytes + BODY_ALLOWANCE
    limited = limited_request(request, limit)
    form = await limited.form(max_files=1, max_fields=3, max_part_size=FORM_PART_LIMIT)
    try:
        unknown = sorted(set(form.keys()) - {"id", "audio", "text"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; accepted: id, audio, text")
        missing = [name for name in ("id", "audio", "text") if name not in form]
        if missing:
            raise ApiError(400, f"missing required field(s) {', '.join(missing)}")
        upload = form["audio"]
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "audio must be a file upload")
        return form["id"], form["text"], audio_bytes(await upload.read(), "audio", max_bytes), upload.filename
    finally:
        await form.close()


async def references_add(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    engine = fish_engine(state)
    reference_id, text, data, filename = await _read_add_form(request, state)
    if not isinstance(reference_id, str) or not isinstance(text, str):
        raise ApiError(400, "id and text must be text fields")
    check_reference_id(reference_id, "id")
    if not text.strip():
        raise ApiError(400, "text is empty: the transcript of the reference audio is required")
    await state.add_speaker(engine, reference_id, data, text.strip(), "audio",
                            {"source_file": filename or "", "added_via": "/v1/references/add"},
                            taken=f"Reference voice '{reference_id}' already exists")
    return reply(request, {"success": True, "message": f"Reference voice '{reference_id}' added successfully",
                           "reference_id": reference_id})


async def references_list(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    ids = state.speakers.ids()
    return reply(request, {"success": True, "reference_ids": ids, "message": f"Found {len(ids)} reference voices"})


async def references_delete(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    fields = Fields(await read_payload(request, BODY_ALLOWANCE), ("reference_id",))
    reference_id = fields.string("reference_id")
    stored_reference(state, reference_id)
    await asyncio.to_thread(state.speakers.remove, reference_id)
    return reply(request, {"success": True, "message": f"Reference voice '{reference_id}' deleted successfully",
                           "reference_id": reference_id})


async def references_update(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    fields = Fields(await read_payload(request, BODY_ALLOWANCE), ("old_reference_id", "new_reference_id"))
    old_id, new_id = fields.string("old_reference_id"), fields.string("new_reference_id")
    check_reference_id(new_id, "new_reference_id")
    stored_reference(state, old_id, "old_reference_id")
    if new_id == old_id:
        raise ApiError(400, "new_reference_id is the same as old_reference_id")
    if new_id in state.speakers.ids():
        raise ApiError(409, f"Reference voice '{new_id}' already exists")
    await asyncio.to_thread(state.speakers.rename, old_id, new_id)
    return reply(request, {"success": True,
                           "message": f"Reference voice renamed from '{old_id}' to '{new_id}' successfully",
                           "old_reference_id": old_id, "new_reference_id": new_id})


# ------------------------------------------------------------------------------------------- async tasks


def _tasks(request: Request) -> TaskManager:
    return request.app.state.fish_tasks


def _task_job(state: ServiceState, engine: Engine, params: TTSParams, admission: Admission) -> Job:
    async def job(started: Callable[[], None]) -> bytes:
        stream = await start_synthesis(state, engine, params, False, admission)
        started()
        try:
            chunks = [chunk async for chunk in stream]
        finally:
            stream.cancel()  # a stopped task frees its slot at the generation's next step
        if not chunks:
            raise ApiError(400, NO_AUDIO)
        return await asyncio.to_thread(encode_audio, np.concatenate(chunks), engine.info.sample_rate, params.format)

    return job


async def generate_async(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    engine = fish_engine(state)
    fields = Fields(await read_payload(request, body_limit(state)), ASYNC_FIELDS)
    step_id = fields.string("step_id")
    if not STEP_ID.fullmatch(step_id):
        raise ApiError(400, f"step_id: invalid task id {step_id!r}: use 1-128 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    params = parse_tts(fields, state.settings.fishapi.max_text_length, state.settings.limits.max_upload_bytes,
                       default_format="mp3", default_max_new_tokens=2048)
    if params.reference_id is not None:
        stored_reference(state, params.reference_id)  # 404 now, not a failed task later
    running = _tasks(request).get(step_id)
    if running is not None and not running.finished:
        raise ApiError(409, f"task {step_id!r} is still {running.status}; stop it or use another step_id")
    admission = engine.admit()  # 503 when every slot and queue place is taken
    try:
        task = _tasks(request).start(step_id, params.format, _task_job(state, engine, params, admission),
                                     abandon=admission.release)
    except TaskConflict as e:
        admission.release()
        raise ApiError(409, str(e)) from None
    return reply(request, {"success": True, "message": "Task created and started", "step_id": step_id,
                           "status": task.status})


def _known_task(request: Request) -> Task:
    step_id = request.path_params["step_id"]
    task = _tasks(request).get(step_id)
    if task is None:
        raise ApiError(404, f"Task '{step_id}' not found")
    return task


async def task_status(request: Request) -> Response:
    task = _known_task(request)
    return reply(request, {
        "success": True, "step_id": task.step_id, "status": task.status, "created_at": task.created_at,
        "started_at": task.started_at, "completed_at": task.completed_at,
        "download_url": f"/download_result/{task.step_id}" if task.status == COMPLETED else None,
        "error": task.error,
    })


async def download_result(request: Request) -> Response:
    task = _known_task(request)
    if task.status != COMPLETED:
        raise ApiError(400, f"Task '{task.step_id}' is not completed (status: {task.status})")
    path = _tasks(request).result_path(task)
    if not path.is_file():
        raise ApiError(404, f"the result of task '{task.step_id}' is no longer on the server")
    return FileResponse(path, media_type=AUDIO_MEDIA_TYPES[task.format], filename=f"{task.step_id}.{task.format}")


async def stop_generation(request: Request) -> Response:
    stopped = _tasks(request).stop_all()
    return reply(request, {"success": True, "message": f"Stopped {stopped} task(s)"})


async def stop_task(request: Request) -> Response:
    task = _known_task(request)
    if _tasks(request).stop(task.step_id):
        return reply(request, {"success": True, "message": f"Task {task.step_id} stopped", "step_id": task.step_id,
                               "status": task.status})
    return reply(request, {"success": False, "message": f"Task {task.step_id} already {task.status}",
                           "step_id": task.step_id, "status": task.status})


routes = [
    Route("/v1/health", health, methods=["GET", "POST"]),
    Route("/v1/tts", tts, methods=["POST"]),
    Route("/v1/vqgan/encode", vqgan_encode, methods=["POST"]),
    Route("/v1/vqgan/decode", vqgan_decode, methods=["POST"]),
    Route("/v1/references/add", references_add, methods=["POST"]),
    Route("/v1/references/list", references_list, methods=["GET"]),
    Route("/v1/references/delete", references_delete, methods=["DELETE"]),
    Route("/v1/references/update", references_update, methods=["POST"]),
    Route("/generate_audio_enhanced_async", generate_async, methods=["POST"]),
    Route("/get_task_status/{step_id}", task_status, methods=["GET"]),
    Route("/download_result/{step_id}", download_result, methods=["GET"]),
    Route("/stop_generation", stop_generation, methods=["POST"]),
    Route("/stop_async_task/{step_id}", stop_task, methods=["POST"]),
]
