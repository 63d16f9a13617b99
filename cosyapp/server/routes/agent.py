"""The voice agent's HTTP API: the seed's `POST /run` and RunPod's job routes.

`POST /run` answers as the seed's examples read it: with `streaming`
true (the default), server-sent `data: {"type": "text" | "audio", "content": ...}` lines as the answer is
written and spoken; with `streaming` false, one JSON document `{"id", "status": "success", "output": {...}}`.
Its `id` (also in the `X-Job-Id` header of a stream) is a job id that /status and /stream know.

RunPod's routes, at the root and under RunPod's URL scheme `/v2/<endpoint_id>/...` (the `runpod` client library
with `runpod.endpoint_url_base = "http://HOST:PORT/v2"`): `POST /v2/<endpoint>/run` queues a job and answers
`{"id", "status": "IN_QUEUE"}` at once (RunPod's asynchronous run); `POST /runsync` waits up to `[agent]
runsync_wait_s` for it; `GET /status/<id>`, `GET /stream/<id>` (the chunks made since the last call), `POST
/cancel/<id>`, `GET /v2/<endpoint>/health`.

Bad input is a 400 in the seed's error shape `{"id", "status": "error", "output": {"error", "trace"}}`; so are
the chat model's failures (502/504) and a busy service (503). A client that leaves a /run cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cosyapp.agent.conversations import CONVERSATION_ID
from cosyapp.agent.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, IN_QUEUE, Job
from cosyapp.agent.service import AgentInput, AgentService
from cosyapp.audio import check_duration, decode_audio, wav_bytes
from cosyapp.server.bodies import audio_bytes, base64_size, read_json_object
from cosyapp.server.errors import ApiError, as_api_error
from cosyapp.server.fields import Fields, check_length

INPUT_FIELDS = ("message", "system_message", "system_audio", "conversation_id", "streaming", "format", "temperature",
                "max_new_tokens", "max_text_length")
# RunPod's request keys beside `input`: accepted, and a webhook refused (nothing would call it).
REQUEST_FIELDS = ("input", "webhook", "policy", "s3Config")
FORMATS = ("wav", "mp3", "flac")

log = logging.getLogger("cosyapp.agent")


def _agent(request: Request) -> AgentService:
    return request.app.state.agent


def error_body(job_id: str, message: str, trace: str) -> dict[str, Any]:
    return {"id": job_id, "status": "error", "output": {"error": message, "trace": trace}}


def seed_error(error: ApiError, job_id: str | None = None) -> JSONResponse:
    job_id = job_id or uuid.uuid4().hex
    return JSONResponse(error_body(job_id, error.detail, f"reference {job_id}"), status_code=error.status_code,
                        headers=error.headers)


async def parse_input(request: Request) -> AgentInput:
    """The request's `input`, every field checked (a 400 naming the problem)."""
    agent = _agent(request)
    settings = agent.speech.state.settings
    max_audio_bytes = settings.limits.max_upload_bytes
    body = await read_json_object(request, base64_size(max_audio_bytes) + 256 * 1024)
    outer = Fields(body, REQUEST_FIELDS)
    if outer.get("webhook", None, nullable=True):
        raise ApiError(400, "webhook is not supported: poll /status/<id> or read /stream/<id>")
    fields = Fields(outer.get("input"), INPUT_FIELDS)
    limit = fields.integer("max_text_length", settings.agent.max_text_length, 1, settings.limits.max_text_chars)
    message = fields.text("message", required=True)
    check_length(message, limit, "message", "message is too long: {length} characters, the limit (max_text_length) "
                                            "is {limit}")
    system_message = fields.text("system_message", limit=settings.limits.max_text_chars)
    conversation_id = fields.string("conversation_id", None, nullable=True) or None
    if conversation_id is not None and not CONVERSATION_ID.fullmatch(conversation_id):
        raise ApiError(400, "conversation_id must be 1-128 letters, digits, '_', '.' or '-', starting with a letter "
                            "or digit")
    streaming = fields.boolean("streaming", True)
    audio_format = fields.choice("format", "wav", FORMATS)
    if streaming and audio_format != "wav":
        raise ApiError(400, f"format {audio_format} cannot be streamed; streaming supports only wav "
                            "(or send streaming: false)")
    temperature = fields.number("temperature", 0.7, 0.0, 2.0)
    max_new_tokens = min(fields.integer("max_new_tokens", settings.agent.max_new_tokens, 1, 1_000_000),
                         settings.agent.max_new_tokens_limit)
    system_audio = None
    raw_audio = fields.get("system_audio", None, nullable=True)
    if raw_audio:
        system_audio = await asyncio.to_thread(voice_recording, audio_bytes(raw_audio, "system_audio",
                                                                            max_audio_bytes), settings)
    return AgentInput(message, system_message, system_audio, conversation_id, streaming, audio_format,
                      temperature, max_new_tokens)


def voice_recording(data: bytes, settings: Any) -> bytes:
    """`system_audio` checked (readable audio, at most [agent] max_audio_s long) and cut to the first
    [limits] max_prompt_s seconds, the most a voice is cloned from; as a WAV file."""
    samples, sample_rate = decode_audio(data, "system_audio")
    check_duration(samples, sample_rate, settings.limits.min_prompt_s, settings.agent.max_audio_s, "system_audio")
    return wav_bytes(samples[:int(settings.limits.max_prompt_s * sample_rate)], sample_rate)


async def _submitted(request: Request) -> tuple[Job, AgentInput] | Response:
    """A job for the request (with its input), or the error answer of a bad one."""
    try:
        parsed = await parse_input(request)
    except Exception as e:
        error = as_api_error(e)
        if error is None:  # a bug: the details go to the log, the client gets the reference
            reference = uuid.uuid4().hex
            log.error("agent request %s failed", reference, exc_info=e)
            return seed_error(ApiError(500, "internal error; see the service log"), reference)
        return seed_error(error)
    return _agent(request).submit(parsed), parsed


def _failed(job: Job) -> JSONResponse:
    assert job.error is not None
    return JSONResponse(error_body(job.id, job.error.message, job.error.trace), status_code=job.error.status_code)


async def _until_done_or_gone(request: Request, job: Job, first_chunk: bool = False) -> bool:
    """Wait for the job to finish (or, `first_chunk`, to stream something); False when the client left first
    (the job is cancelled then)."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiting = asyncio.create_task(job.wait(float("inf"), 0 if first_chunk else None))
    watching = asyncio.create_task(client_gone())
    try:
        await asyncio.wait((waiting, watching), return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            _agent(request).jobs.cancel(job)
            return False
        return True
    finally:
        waiting.cancel()
        watching.cancel()


async def run(request: Request) -> Response:
    """The seed's /run: a stream of data lines, or (streaming false) the whole answer. Errors before the first
    line are answered in the seed's error shape with their status."""
    submitted = await _submitted(request)
    if isinstance(submitted, Response):
        return submitted
    job, parsed = submitted
    if not await _until_done_or_gone(request, job, first_chunk=parsed.streaming):
        return Response(status_code=499)
    if job.status == FAILED and not job.chunks:
        return _failed(job)
    if parsed.streaming:
        return StreamingResponse(_data_lines(request, job), media_type="text/event-stream",
                                 headers={"X-Job-Id": job.id, "Cache-Control": "no-cache"})
    if job.status != COMPLETED:
        return _failed(job) if job.error else seed_error(ApiError(409, f"job {job.status.lower()}"), job.id)
    return JSONResponse({"id": job.id, "status": "success", "output": job.output})


async def _data_lines(request: Request, job: Job) -> AsyncIterator[bytes]:
    """The job's chunks as `data:` lines, then an error line if it failed; a client that leaves cancels the job."""
    try:
        async for chunk in job.follow():
            yield _data_line(chunk)
        if job.status == FAILED and job.error is not None:
            yield _data_line({"type": "error", "content": job.error.message, "trace": job.error.trace})
    finally:
        if not job.finished:
            _agent(request).jobs.cancel(job)


def _data_line(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# ---- RunPod's job routes ------------------------------------------------------------------------------------


def job_state(job: Job) -> dict[str, Any]:
    """RunPod's /status answer."""
    state: dict[str, Any] = {"id": job.id, "status": job.status, **job.times_ms()}
    if job.status == COMPLETED:
        state["output"] = job.output
    elif job.status == FAILED and job.error is not None:
        state["error"] = job.error.message
        state["output"] = error_body(job.id, job.error.message, job.error.trace)["output"]
    return state


def _job(request: Request) -> Job:
    job = _agent(request).jobs.get(request.path_params["job_id"])
    if job is None:
        raise ApiError(404, f"no job {request.path_params['job_id']!r} (finished jobs are kept "
                            f"{_agent(request).settings.keep_jobs_minutes:g} minutes)")
    return job


def _runpod_error(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


async def run_queued(request: Request) -> Response:
    """RunPod's asynchronous /run: the job is queued and its id answered at once."""
    submitted = await _submitted(request)
    if isinstance(submitted, Response):
        return submitted
    job, _ = submitted
    return JSONResponse({"id": job.id, "status": job.status})


async def runsync(request: Request) -> Response:
    submitted = await _submitted(request)
    if isinstance(submitted, Response):
        return submitted
    job, _ = submitted
    await job.wait(_agent(request).settings.runsync_wait_s)
    return JSONResponse(job_state(job))


async def status(request: Request) -> Response:
    try:
        return JSONResponse(job_state(_job(request)))
    except ApiError as e:
        return _runpod_error(e)


async def stream(request: Request) -> Response:
    """The chunks made since the last call, each as RunPod wraps a streamed output."""
    try:
        job = _job(request)
    except ApiError as e:
        return _runpod_error(e)
    if not job.finished:
        await job.wait(1.0, job.polled)  # a short wait for something new, so that a poller gets chunks as they come
    chunks = job.new_chunks()
    return JSONResponse({"id": job.id, "status": job.status, "stream": [{"output": chunk} for chunk in chunks]})


async def cancel(request: Request) -> Response:
    try:
        job = _job(request)
    except ApiError as e:
        return _runpod_error(e)
    _agent(request).jobs.cancel(job)
    return JSONResponse({"id": job.id, "status": job.status})


async def health(request: Request) -> Response:
    """RunPod's endpoint health: jobs by state, and the turn slots as workers."""
    agent = _agent(request)
    counts = agent.jobs.counts()
    running = counts[IN_PROGRESS]
    return JSONResponse({"jobs": {"completed": counts[COMPLETED], "failed": counts[FAILED],
                                  "cancelled": counts[CANCELLED], "inProgress": running, "inQueue": counts[IN_QUEUE],
                                  "retried": 0},
                         "workers": {"idle": max(agent.settings.max_concurrent - running, 0), "running": running}})


def _job_routes(prefix: str) -> list[Route]:
    return [Route(f"{prefix}/runsync", runsync, methods=["POST"]),
            Route(f"{prefix}/status/{{job_id}}", status, methods=["GET", "POST"]),
            Route(f"{prefix}/stream/{{job_id}}", stream, methods=["GET", "POST"]),
            Route(f"{prefix}/cancel/{{job_id}}", cancel, methods=["POST"])]


RUNPOD_PREFIX = "/v2/{endpoint_id}"
routes = [Route("/run", run, methods=["POST"]), *_job_routes(""),
          Route(f"{RUNPOD_PREFIX}/run", run_queued, methods=["POST"]), *_job_routes(RUNPOD_PREFIX),
          Route(f"{RUNPOD_PREFIX}/health", health, methods=["GET"])]
