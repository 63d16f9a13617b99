"""Agent jobs with RunPod's states: IN_QUEUE (waiting for a turn slot) -> IN_PROGRESS -> COMPLETED | FAILED |
CANCELLED. A job keeps what it streams (chunks, in order) and, once done, its output or error, so that a client
may follow it live (`follow`), poll it (`/status`, `/stream`) or cancel it. Finished jobs are kept in memory for
`keep_s` seconds and at most `max_jobs` of them (the oldest go first)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass
class JobError:
    message: str  # safe to show
    status_code: int  # the HTTP status an answer that waited for the job carries
    trace: str  # a reference to find the details in the service log


@dataclass(eq=False)
class Job:
    id: str
    status: str = IN_QUEUE
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished_at: float | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)
    polled: int = 0  # chunks already handed out by /stream
    output: dict[str, Any] | None = None
    error: JobError | None = None
    task: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        if self.status == IN_QUEUE:
            self.status, self.started = IN_PROGRESS, time.monotonic()
            self._notify()

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)
        self._notify()

    def finish(self, status: str, output: dict[str, Any] | None = None, error: JobError | None = None) -> bool:
        """Move to a final status; False when the job had finished already."""
        if self.finished:
            return False
        self.status, self.output, self.error, self.finished_at = status, output, error, time.monotonic()
        self._notify()
        return True

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every chunk, from the first, as it comes, until the job finishes."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.chunks):
                yield self.chunks[sent]
                sent += 1
            if self.finished:
                return
            await changed.wait()

    async def wait(self, timeout_s: float, more_chunks_than: int | None = None) -> None:
        """Until the job finishes (or has more than `more_chunks_than` chunks) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while not (self.finished or (more_chunks_than is not None and len(self.chunks) > more_chunks_than)) \
                and (left := deadline - time.monotonic()) > 0:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                return

    def new_chunks(self) -> list[dict[str, Any]]:
        """The chunks /stream has not handed out yet."""
        chunks = self.chunks[self.polled:]
        self.polled = len(self.chunks)
        return chunks

    def times_ms(self) -> dict[str, int]:
        """RunPod's delayTime (queued) and executionTime (running), in milliseconds."""
        now = time.monotonic()
        started = self.started if self.started is not None else (self.finished_at or now)
        times = {"delayTime": int(1000 * (started - self.created))}
        if self.started is not None:
            times["executionTime"] = int(1000 * ((self.finished_at or now) - self.started))
        return times


class JobRegistry:
    def __init__(self, keep_s: float, max_jobs: int) -> None:
        self.keep_s = keep_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}

    def new(self) -> Job:
        self._sweep()
        job = Job(uuid.uuid4().hex)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)}
        for job in self._jobs.values():
            counts[job.status] += 1
        return counts

    def cancel(self, job: Job) -> bool:
        """Stop a queued or running job (its chat stream and synthesis with it); False when it had finished."""
        if not job.finish(CANCELLED):
            return False
        if job.task is not None:
            job.task.cancel()
        return True

    async def close(self) -> None:
        jobs = [job for job in self._jobs.values() if not job.finished]
        for job in jobs:
            self.cancel(job)
        await asyncio.gather(*(job.task for job in jobs if job.task is not None), return_exceptions=True)

    def _sweep(self) -> None:
        now = time.monotonic()
        finished = sorted((job for job in self._jobs.values() if job.finished), key=lambda job: job.finished_at or 0)
        excess = len(self._jobs) - self.max_jobs + 1
        for job in finished:
            if excess > 0 or (job.finished_at or now) < now - self.keep_s:
                del self._jobs[job.id]
                excess -= 1
