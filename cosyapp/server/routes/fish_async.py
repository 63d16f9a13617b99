"""The Fish API's asynchronous generation (never in upstream's server; the seed's client uses it):

    POST /generate_audio_enhanced_async     AsyncGenerateRequest -> a task (`fish_tasks.py` keeps them)
    GET  /get_task_status/{step_id}, GET /download_result/{step_id}
    POST /stop_generation, POST /stop_async_task/{step_id}

A task's request is checked when it is created (a 400 or 404 now, not a failed task later) and takes its engine
place then (503 when every slot and queue place is taken); its synthesis runs in the background.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cosyapp.audio import AUDIO_MEDIA_TYPES, encode_audio
from cosyapp.engine.scheduler import Admission
from cosyapp.server.errors import ApiError, as_api_error, quote
from cosyapp.server.fields import Fields
from cosyapp.server.fish_tasks import COMPLETED, STEP_ID, Job, Task, TaskConflict, TaskManager
from cosyapp.server.fish_wire import FISH, TTS_FIELDS, body_limit, fish_served, parse_tts, read_payload, reply
from cosyapp.server.speech import SpeechRequest, SpeechService

# AsyncGenerateRequest: step_id and ServeTTSRequest's fields but `streaming` (a task makes a file).
ASYNC_FIELDS = ("step_id", *(name for name in TTS_FIELDS if name != "streaming"))


def _tasks(request: Request) -> TaskManager:
    return request.app.state.fish_tasks


def _task_job(speech: SpeechService, body: SpeechRequest, audio_format: str, admission: Admission) -> Job:
    async def job(started: Callable[[], None]) -> bytes:
        record = speech.record()
        try:
            synthesis = await speech.start(body, record, admission, on_slot=started)
            audio = await synthesis.whole()  # a stopped task frees its slot at the generation's next step
            record.audio_samples = audio.shape[0]
            data = await asyncio.to_thread(encode_audio, audio, synthesis.sample_rate, audio_format)
        except asyncio.CancelledError:
            record.finish(499, "cancelled")  # stopped
            raise
        except Exception as e:
            error = as_api_error(e)
            record.finish(error.status_code if error else 500,
                          f"failed({error.detail if error else type(e).__name__})")
            raise
        record.finish(200, "ok")
        return data

    return job


async def generate_async(request: Request) -> Response:
    speech: SpeechService = request.app.state.speech
    state = speech.state
    fish_served(state)
    state.ready_engine(FISH)
    fields = Fields(await read_payload(request, body_limit(state)), ASYNC_FIELDS)
    step_id = fields.string("step_id")
    if not STEP_ID.fullmatch(step_id):
        raise ApiError(400, f"step_id: invalid task id {quote(step_id)}: use 1-128 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    params = parse_tts(fields, state, default_format="mp3",
                       default_max_new_tokens=2048)
    speech.parse_options(params.speech)  # bad options are a 400 now, not a failed task
    running = _tasks(request).get(step_id)
    if running is not None and not running.finished:
        raise ApiError(409, f"task {step_id!r} is still {running.status}; stop it or use another step_id")
    admission = speech.admit(params.speech)  # 503 when every slot and queue place is taken
    try:
        task = _tasks(request).start(step_id, params.format, _task_job(speech, params.speech, params.format, admission),
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
    data = await asyncio.to_thread(_tasks(request).result, task)
    if data is None:
        raise ApiError(404, f"the result of task '{task.step_id}' is no longer on the server")
    return Response(data, media_type=AUDIO_MEDIA_TYPES[task.format],
                    headers={"Content-Disposition": f'attachment; filename="{task.step_id}.{task.format}"'})


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
    Route("/generate_audio_enhanced_async", generate_async, methods=["POST"]),
    Route("/get_task_status/{step_id}", task_status, methods=["GET"]),
    Route("/download_result/{step_id}", download_result, methods=["GET"]),
    Route("/stop_generation", stop_generation, methods=["POST"]),
    Route("/stop_async_task/{step_id}", stop_task, methods=["POST"]),
]
