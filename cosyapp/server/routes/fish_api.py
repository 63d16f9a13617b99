"""The Fish Speech HTTP API (seed 001) on the Fish engine: a thin adapter over the speech service (`speech.py`).

    GET|POST /v1/health                     {"status": "ok"} (no API key needed)
    POST /v1/tts                            ServeTTSRequest -> audio (wav, pcm, mp3, opus, flac; wav/pcm streamed)
    POST /v1/vqgan/encode                   {"audios": [bytes]} -> {"tokens": [[10][T] ints]}
    POST /v1/vqgan/decode                   {"tokens": [[10][T] ints]} -> {"audios": [float16 PCM bytes]}
    POST /v1/references/add                 multipart id, audio (file), text -> stored in the speaker registry
    GET  /v1/references/list, DELETE /v1/references/delete, POST /v1/references/update
    POST /generate_audio_enhanced_async     AsyncGenerateRequest -> a task                  (`fish_async.py`)
    GET  /get_task_status/{step_id}, GET /download_result/{step_id}, POST /stop_generation,
    POST /stop_async_task/{step_id}                                                         (`fish_async.py`)
    WebSocket /v1/tts/live                  Fish's live text-in, audio-out protocol         (`fish_live.py`)

The wire format they share (msgpack or JSON bodies and answers, ServeTTSRequest) is `fish_wire.py`; the
sampling options are the Fish backend's, checked by it. The codec routes run in a synthesis slot (503 when every
slot and queue place is taken). Errors are `{"detail": "..."}` with the seed's status codes.

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
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosyapp.server.audio_responses import audio_response, speech_response
from cosyapp.server.bodies import audio_bytes, media_type, read_form
from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields
from cosyapp.server.fish_wire import (BODY_ALLOWANCE, FISH, NOT_SERVED, TTS_FIELDS, audio_list, body_limit,
                                      check_reference_id, fish_served, not_found, parse_tts, read_payload, reply,
                                      stored_reference)
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import SpeechService
from cosyapp.server.state import ServiceState

STREAM_FORMATS = ("wav", "pcm")
# Longest code sequence /v1/vqgan/decode takes (~6 min of audio at 21.5 frames/s).
MAX_DECODE_FRAMES = 8192


# ------------------------------------------------------------------------------------------- /v1/health


async def health(request: Request) -> JSONResponse:
    state: ServiceState = request.app.state.service
    if FISH not in state.backends:
        return JSONResponse({"status": "error", "detail": NOT_SERVED}, status_code=503)
    if state.status == "ok":
        return JSONResponse({"status": "ok"})
    return JSONResponse(state.not_ready(), status_code=503)


# ---------------------------------------------------------------------------------------------- /v1/tts


async def tts(request: Request) -> Response:
    speech: SpeechService = request.app.state.speech
    state = speech.state

    async def answer(record: RequestRecord, headers: dict[str, str]) -> Response:
        fish_served(state)
        state.ready_engine(FISH)  # 503 while loading, before reading the body
        fields = Fields(await read_payload(request, body_limit(state)), TTS_FIELDS)
        params = parse_tts(fields, state)
        if params.streaming and params.format not in STREAM_FORMATS:
            raise ApiError(400, f"Streaming only supports the {' and '.join(STREAM_FORMATS)} formats; "
                                f"got {quote(params.format)}")
        started = await speech.start(params.speech, record)
        headers = {**headers, "Content-Disposition": f"attachment; filename=audio.{params.format}"}
        return await audio_response(request, started, record, params.format, headers, params.streaming,
                                    wav_stream_header=state.settings.fishapi.wav_stream_header)

    return await speech_response(speech, answer)


# ------------------------------------------------------------------------------------------ /v1/vqgan/*


async def vqgan_encode(request: Request) -> Response:
    speech: SpeechService = request.app.state.speech
    fish_served(speech.state)
    speech.codec_codebooks(FISH)
    fields = Fields(await read_payload(request, body_limit(speech.state)), ("audios",))
    recordings = audio_list(fields, "audios", speech.state.settings.limits.max_upload_bytes)
    codes = await speech.encode_codes(FISH, recordings)
    return reply(request, {"tokens": [grid.tolist() for grid in codes]})


def _codes(value: Any, what: str, n_codebooks: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != n_codebooks or not all(isinstance(r, list) for r in value):
        raise ApiError(400, f"{what} must be {n_codebooks} lists of codes (one per codebook)")
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value):
        raise ApiError(400, f"{what}: every codebook row needs the same, non-zero number of codes")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 or c >= 2**31 for row in value for c in row):
        raise ApiError(400, f"{what}: codes must be non-negative integers")
    return np.array(value, dtype=np.int64)


async def vqgan_decode(request: Request) -> Response:
    speech: SpeechService = request.app.state.speech
    fish_served(speech.state)
    n_codebooks = speech.codec_codebooks(FISH)
    fields = Fields(await read_payload(request, body_limit(speech.state)), ("tokens",))
    values = fields.get("tokens")
    if not isinstance(values, list) or not values:
        raise ApiError(400, "tokens must be a non-empty list of code grids [codebooks][frames]")
    grids = [_codes(value, f"tokens[{i}]", n_codebooks) for i, value in enumerate(values)]
    frames = sum(grid.shape[1] for grid in grids)
    if frames > MAX_DECODE_FRAMES:
        raise ApiError(400, f"tokens: at most {MAX_DECODE_FRAMES} frames per request; got {frames}")
    audios = await speech.decode_codes(FISH, grids)
    return reply(request, {"audios": [audio.astype(np.float16).tobytes() for audio in audios]})


# ------------------------------------------------------------------------------------- /v1/references/*


async def _read_add_form(request: Request, state: ServiceState) -> tuple[Fields, bytes, str | None]:
    """(the fields, the audio, its file name) from multipart (the seed) or from a msgpack/JSON body."""
    max_bytes = state.settings.limits.max_upload_bytes
    accepted = ("id", "audio", "text")
    if media_type(request) != "multipart/form-data":
        fields = Fields(await read_payload(request, body_limit(state)), accepted)
        return fields, audio_bytes(fields.get("audio"), "audio", max_bytes), None
    async with read_form(request, accepted, max_bytes + BODY_ALLOWANCE, max_files=1) as fields:
        upload = fields.get("audio")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "audio must be a file upload")
        return fields, audio_bytes(await upload.read(), "audio", max_bytes), upload.filename


async def references_add(request: Request) -> Response:
    state: ServiceState = request.app.state.service
    fish_served(state)
    engine = state.ready_engine(FISH)
    fields, data, filename = await _read_add_form(request, state)
    reference_id, text = fields.string("id"), fields.string("text")
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
    check_reference_id(reference_id, "reference_id")
    await state.remove_speaker(reference_id, not_found(reference_id))
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


routes = [
    Route("/v1/health", health, methods=["GET", "POST"]),
    Route("/v1/tts", tts, methods=["POST"]),
    Route("/v1/vqgan/encode", vqgan_encode, methods=["POST"]),
    Route("/v1/vqgan/decode", vqgan_decode, methods=["POST"]),
    Route("/v1/references/add", references_add, methods=["POST"]),
    Route("/v1/references/list", references_list, methods=["GET"]),
    Route("/v1/references/delete", references_delete, methods=["DELETE"]),
    Route("/v1/references/update", references_update, methods=["POST"]),
]
