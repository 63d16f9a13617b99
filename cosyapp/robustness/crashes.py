"""kill -9 consistency rounds: the service is killed while it adds reference voices and runs async tasks, then
started again on the same data; nothing it acknowledged may be missing.

Acknowledged: a voice whose add was answered 200 must be listed and usable by id; a task whose creation was
answered 200 must still have a status; a task reported completed must still be completed with its result
downloadable. Each round starts the service (on the data the round before left), checks everything acknowledged
so far, puts it under that load and kills it after a random moment."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cosyapp.robustness.service import PROMPT_B64, CampaignModels, campaign_service


@dataclass
class CrashResult:
    rounds: int = 0
    voices_acknowledged: int = 0
    tasks_acknowledged: int = 0
    tasks_completed: int = 0
    lost: list[str] = field(default_factory=list)  # what was acknowledged and is gone (or broken)
    seconds: float = 0.0


@dataclass
class _Acknowledged:
    voices: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)
    completed: set[str] = field(default_factory=set)


async def _check(client: httpx.AsyncClient, seen: _Acknowledged, lost: list[str], round_: int) -> None:
    listed = set((await client.get("/v1/references/list")).json()["reference_ids"])
    for voice in sorted(seen.voices - listed):
        lost.append(f"round {round_}: voice {voice} is not listed")
    for task in sorted(seen.tasks):
        answer = await client.get(f"/get_task_status/{task}")
        if answer.status_code != 200:
            lost.append(f"round {round_}: task {task}: status answered {answer.status_code}")
        elif task in seen.completed:
            if answer.json()["status"] != "completed":
                lost.append(f"round {round_}: completed task {task} is now {answer.json()['status']}")
            elif not (await client.get(f"/download_result/{task}")).content:
                lost.append(f"round {round_}: completed task {task} has no result")


async def _load(client: httpx.AsyncClient, seen: _Acknowledged, round_: int, stop: asyncio.Event) -> None:
    """Add voices and create tasks (and poll them) until `stop` or the service dies."""
    count = 0

    async def add_voices() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1
            voice = f"crash_{round_}_{count}"
            answer = await client.post("/v1/references/add", json={"id": voice, "audio": PROMPT_B64,
                                                                   "text": "hello there"})
            if answer.status_code == 200:
                seen.voices.add(voice)

    async def run_tasks() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1
            task = f"task_{round_}_{count}"
            answer = await client.post("/generate_audio_enhanced_async",
                                       json={"step_id": task, "text": "hello.", "max_new_tokens": 8, "format": "wav"})
            if answer.status_code == 200:
                seen.tasks.add(task)
            for known in sorted(seen.tasks - seen.completed)[-8:]:
                status = await client.get(f"/get_task_status/{known}")
                if status.status_code == 200 and status.json()["status"] == "completed":
                    seen.completed.add(known)
            await asyncio.sleep(0.05)

    # Each loop ends with the transport error of its request in flight when the service is killed.
    for outcome in await asyncio.gather(add_voices(), add_voices(), run_tasks(), return_exceptions=True):
        if outcome is not None and not isinstance(outcome, httpx.TransportError):
            raise outcome


async def run_crash_rounds(models: CampaignModels, workdir: Path, rounds: int, seed: int = 0,
                           max_kill_after_s: float = 4.0) -> CrashResult:
    rng = random.Random(seed)
    seen = _Acknowledged()
    result = CrashResult()
    started = time.perf_counter()
    for round_ in range(rounds + 1):  # the last start only checks what the last kill left
        with campaign_service(models, workdir, COSYAPP_MODEL_WARMUP="false") as service:
            async with httpx.AsyncClient(base_url=service.url, timeout=30, trust_env=False) as client:
                await _check(client, seen, result.lost, round_)
                if round_ == rounds:
                    break
                stop = asyncio.Event()
                load = asyncio.create_task(_load(client, seen, round_, stop))
                await asyncio.sleep(rng.uniform(0.5, max_kill_after_s))
                os.kill(service.pid, signal.SIGKILL)
                stop.set()
                await load
            result.rounds += 1
    result.voices_acknowledged = len(seen.voices)
    result.tasks_acknowledged = len(seen.tasks)
    result.tasks_completed = len(seen.completed)
    result.seconds = time.perf_counter() - started
    return result
