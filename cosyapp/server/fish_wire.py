"""The Fish Speech API's wire format, shared by its HTTP routes, its async tasks and its live socket: msgpack or
JSON bodies and answers, ServeTTSRequest -> `SpeechRequest`, and the seed's reference-id rule.

Bodies are application/msgpack (ormsgpack) or application/json; bytes fields (audio) are msgpack binary or
base64 strings. Answers are JSON unless the client asks for msgpack (`?format=msgpack`, or an Accept header
naming application/msgpack and not application/json): upstream defaulted to msgpack, but the seed's examples
read the reference and stop answers with `response.json()` without asking. In JSON answers bytes are base64.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import ormsgpack
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cosyapp.audio import AUDIO_MEDIA_TYPES
from cosyapp.engine.types import InputError
from cosyapp.server.bodies import audio_bytes, decode_document, limited_request, media_type
from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields, check_length, sample_rate
from cosyapp.server.speech import Recording, SpeechRequest, VoiceReference
from cosyapp.server.state import ServiceState
from cosyapp.storage import StoredVoice
from cosyapp.voices import validate_speaker_id

FISH = "fish"
NOT_SERVED = ("this service does not run the Fish backend: set [model] backend = \"fish\" (or extra_backend = "
              "\"fish\") in config.toml")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
JSON_TYPE = "application/json"
# Inline audio per request (references, vqgan audios); bodies are capped accordingly (base64 adds a third).
MAX_INLINE_AUDIOS = 4
BODY_ALLOWANCE = 1 << 20
# The seed's rule for reference ids; the speaker registry then applies its own (stricter) one.
REFERENCE_ID = re.compile(r"[A-Za-z0-9\-_ ]{1,255}")
TEXT_TOO_LONG = "Text is too long, max length is {limit}"

# ServeTTSRequest's fields that are the Fish backend's options, by the same names (the backend checks them).
OPTION_FIELDS = ("chunk_length", "max_new_tokens", "top_p", "repetition_penalty", "temperature")
# `sample_rate` is the Fish cloud API's: the rate of the audio sent (resampled on the server while streaming).
TTS_FIELDS = ("text", "format", "latency", "references", "reference_id", "seed", "use_memory_cache", "normalize",
              "streaming", "sample_rate", *OPTION_FIELDS)


def fish_served(state: ServiceState) -> None:
    """A 503 saying so when the service does not run the Fish backend."""
    if FISH not in state.backends:
        raise ApiError(503, NOT_SERVED)


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
    return decode_document(body, "MessagePack" if content_type in MSGPACK_TYPES else "JSON")


def wants_msgpack(request: Request) -> bool:
    """`?format=json|msgpack` decides; else an Accept header naming msgpack and not JSON; else JSON."""
    query = request.query_params.get("format")
    if query is not None:
        if query not in ("json", "msgpack"):
            raise ApiError(400, f"the format query parameter must be json or msgpack; got {quote(query)}")
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


def audio_list(fields: Fields, name: str, max_bytes: int) -> list[Recording]:
    values = fields.get(name)
    if not isinstance(values, list) or not values:
        raise ApiError(400, f"{name} must be a non-empty list of audio files")
    if len(values) > MAX_INLINE_AUDIOS:
        raise ApiError(400, f"{name}: at most {MAX_INLINE_AUDIOS} audio files per request; got {len(values)}")
    return [Recording(audio_bytes(value, f"{name}[{i}]", max_bytes), f"{name}[{i}]") for i, value in enumerate(values)]


# ------------------------------------------------------------------------------------------ reference ids


def check_reference_id(reference_id: str, field: str) -> None:
    """400 unless the id passes the seed's rule and the speaker registry's (letters, digits, '-', '_', at most 64
    characters, starting with a letter or digit: references are stored as registry folders)."""
    if not REFERENCE_ID.fullmatch(reference_id):
        raise ApiError(400, f"{field}: invalid reference id {quote(reference_id)}: use 1-255 letters, digits, '-', '_' "
                            "or spaces")
    try:
        validate_speaker_id(reference_id)
    except InputError as e:
        raise ApiError(400, f"{field}: {e} (references are stored in the speaker registry)") from None


def not_found(reference_id: str) -> str:
    return f"Reference voice '{reference_id}' not found"


def stored_reference(state: ServiceState, reference_id: str, field: str = "reference_id") -> StoredVoice:
    """A registered reference voice: 400 for an invalid id, 404 for an unknown one."""
    check_reference_id(reference_id, field)
    if reference_id not in state.speakers.ids():
        raise ApiError(404, not_found(reference_id))
    return state.speakers.get(reference_id)


# -------------------------------------------------------------------------------------- ServeTTSRequest


@dataclass(frozen=True)
class TTSParams:
    speech: SpeechRequest
    format: str
    streaming: bool


def _references(fields: Fields, max_bytes: int, max_text_chars: int) -> tuple[Recording, ...]:
    values = fields.get("references", [])
    if not isinstance(values, list):
        raise ApiError(400, "references must be a list of {audio, text} objects")
    if len(values) > MAX_INLINE_AUDIOS:
        raise ApiError(400, f"references: at most {MAX_INLINE_AUDIOS} per request; got {len(values)}")
    references = []
    for i, value in enumerate(values):
        item = Fields(value, ("audio", "text"))
        what = f"references[{i}].audio"
        transcript = check_length(item.string("text") or "", max_text_chars, f"references[{i}].text")
        references.append(Recording(audio_bytes(item.get("audio"), what, max_bytes), what, transcript))
    return tuple(references)


def parse_tts(fields: Fields, state: ServiceState, default_format: str = "wav",
              default_max_new_tokens: int = 1024, text_required: bool = True) -> TTSParams:
    """ServeTTSRequest (and AsyncGenerateRequest, with its defaults) with the seed's defaults. A live session's
    request (`text_required=False`) may have no text: its text comes in events. The voice: `reference_id` (it
    wins, as upstream; 404 when unknown), else the inline references, else none (the model picks)."""
    text = fields.string("text") if text_required else fields.string("text", "")
    if text_required and not text.strip():
        raise ApiError(400, "text is empty")
    max_text_chars = state.settings.limits.max_text_chars
    check_length(text, max_text_chars, "text", TEXT_TOO_LONG)
    options = {name: fields.get(name) for name in OPTION_FIELDS if name in fields}
    options.setdefault("max_new_tokens", default_max_new_tokens)
    fields.choice("use_memory_cache", "off", ("on", "off"))
    fields.choice("latency", "normal", ("normal", "balanced"))  # newer clients send it; no effect
    fields.boolean("normalize", True)
    reference_id = fields.string("reference_id", None, nullable=True)
    references = _references(fields, state.settings.limits.max_upload_bytes, max_text_chars)
    if reference_id is not None:
        stored_reference(state, reference_id)  # a 404 now, not a random voice (nor a failed task later)
        voice = VoiceReference(speaker=reference_id)
    else:
        voice = VoiceReference(recordings=references, model_voice=not references)
    streaming = fields.boolean("streaming", False)
    speech = SpeechRequest(text=text, voice=voice, options=options, stream=streaming,
                           seed=fields.integer("seed", None, nullable=True), backend=FISH,
                           sample_rate=sample_rate(fields))
    return TTSParams(speech=speech, format=fields.choice("format", default_format, AUDIO_MEDIA_TYPES),
                     streaming=streaming)
