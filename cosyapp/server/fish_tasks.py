"""The Fish API's asynchronous generation tasks: the asyncio jobs that run them, their records in a task store.

The records and results live in a task store (cosyapp/storage/tasks.py: folders on the local disk by default, or
the cluster's shared store), so any replica answers a task's status and result. A task this process runs is
also kept in memory while it runs, and its runner is the only writer of its progress.

Tasks that a process was running when it stopped come back failed ("interrupted"): their inputs (inline
reference audio) are not kept. On the local disk that is decided when the service starts again (it was the only
process). In a shared store each running task holds a lease its process renews every `lease_s / 3` seconds; a
reader that finds an unfinished task whose lease ran out (its replica died) records it failed, so a task is never
lost or stuck. A task stopped through another replica is cancelled by its own runner at its next renewal.

A finished task may be replaced by a new one with the same step_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

from cosyapp.server.errors import as_api_error
from cosyapp.storage import TaskStore
from cosyapp.storage.tasks import (CANCELLED, COMPLETED, FAILED, FINISHED, PENDING, PROCESSING, STEP_ID, DiskTaskStore,
                                   Task)

__all__ = ["CANCELLED", "COMPLETED", "FAILED", "FINISHED", "INTERRUPTED", "PENDING", "PROCESSING", "STEP_ID", "Job",
           "Task", "TaskConflict", "TaskManager"]

log = logging.getLogger("cosyapp.tasks")

INTERRUPTED = "interrupted: the service stopped before the task finished"
LEASE_S = 15.0  # a shared store's tasks whose replica has not renewed them for this long are failed

# A job gets a callback to report that it holds a synthesis slot, and returns the encoded result file.
Job = Callable[[Callable[[], None]], Awaitable[bytes]]


class TaskConflict(Exception):
    """A task with this step_id is still pending or processing."""


def _failure_message(exc: BaseException) -> str:
    """What the task status shows: the client-facing message of expected errors, nothing internal otherwise."""
    error = as_api_error(exc) if isinstance(exc, Exception) else None
    if error is not None:
        return error.detail
    log.error("async task failed", exc_info=exc)
    return f"internal error ({type(exc).__name__}); see the service log"


class TaskManager:
    def __init__(self, store: TaskStore | str | Path, keep_s: float = 0.0, lease_s: float = LEASE_S) -> None:
        """`store`: a task store, or the folder of a local-disk one. `keep_s`: finished tasks older than this many
        seconds are deleted (0: kept forever). `lease_s`: see the module docstring (shared stores only)."""
        self.store = DiskTaskStore(store) if isinstance(store, (str, Path)) else store
        self.keep_s = keep_s
        self.lease_s = lease_s
        self._running: dict[str, Task] = {}  # the tasks this process runs, until they finish
        self._jobs: dict[str, asyncio.Task] = {}
        self._renewals: asyncio.Task | None = None
        if not self.store.leases:
            for task in self.store.tasks():  # this process is the store's only user: nobody runs these any more
                self._finish(task, FAILED, INTERRUPTED)
        self._sweep()

    def _finish(self, task: Task, status: str, error: str | None = None) -> bool:
        """Move an unfinished task to a final status; False when it (or its stored record) had already finished."""
        if task.finished:
            return False
        task.status, task.error, task.completed_at = status, error, time.time()
        return self.store.finish(task)

    def _sweep(self) -> None:
        """Delete finished tasks older than `keep_s`."""
        if self.keep_s <= 0:
            return
        cutoff = time.time() - self.keep_s
        for task in self.store.tasks():
            if task.finished and (task.completed_at or task.created_at) < cutoff:
                self.store.delete(task.step_id)

    def get(self, step_id: str) -> Task | None:
        if not STEP_ID.fullmatch(step_id):
            return None
        if step_id in self._running and not self.store.leases:
            return self._running[step_id]
        task = self.store.load(step_id)  # shared: the record another replica may have stopped
        if task is not None and not task.finished and step_id not in self._jobs and not self.store.alive(step_id):
            self._finish(task, FAILED, INTERRUPTED)  # its replica died: nobody will finish it
        return task

    def result(self, task: Task) -> bytes | None:
        """The result file of a completed task (None when it is no longer kept)."""
        return self.store.read_result(task)

    def result_path(self, task: Task) -> Path:
        """Where a local-disk store keeps the result of `task`."""
        return self.store.result_path(task)

    def start(self, step_id: str, audio_format: str, job: Job, abandon: Callable[[], None]) -> Task:
        """Record a new pending task and start `job` for it. Raises TaskConflict while one with this id runs.

        `abandon` is called if the task is stopped before its job ever ran (the job then cannot clean up after
        itself, e.g. give back the engine place taken for it)."""
        old = self.get(step_id)
        if old is not None and not old.finished:
            raise TaskConflict(f"task {step_id!r} is still {old.status}; stop it or use another step_id")
        self._sweep()
        if old is not None:
            self.store.delete(step_id)
        task = Task(step_id=step_id, format=audio_format, status=PENDING, created_at=time.time())
        self.store.renew(step_id, self.lease_s)  # leased before it is visible: no reader takes it for lost
        self.store.save(task)
        self._running[step_id] = task
        runner = asyncio.create_task(self._run(task, job), name=f"task-{step_id}")
        runner.add_done_callback(lambda done: self._ended(step_id, done, abandon))
        self._jobs[step_id] = runner
        if self.store.leases and self._renewals is None:
            self._renewals = asyncio.create_task(self._renew_leases(), name="task-leases")
        return task

    def _started(self, task: Task) -> None:
        if task.status == PENDING:
            task.status, task.started_at = PROCESSING, time.time()
            self.store.save(task)

    async def _run(self, task: Task, job: Job) -> None:
        try:
            data = await job(lambda: self._started(task))
            await asyncio.to_thread(self.store.write_result, task, data)
            self._finish(task, COMPLETED)
        except asyncio.CancelledError:
            pass  # stop() or close() already recorded why
        except Exception as e:
            self._finish(task, FAILED, _failure_message(e))

    def _ended(self, step_id: str, runner: asyncio.Task, abandon: Callable[[], None]) -> None:
        # `_run` swallows cancellation once it runs, so a cancelled runner is one whose job never started.
        if runner.cancelled():
            abandon()
        if self._jobs.get(step_id) is runner:  # not replaced by a newer task with the same id
            del self._jobs[step_id]
            del self._running[step_id]
            self.store.release(step_id)

    async def _renew_leases(self) -> None:
        """Renew the leases of this process's tasks; cancel those that were stopped through another replica."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            running = list(self._running)
            stopped = await asyncio.to_thread(self._renew, running)
            for step_id in stopped:
                task, job = self._running.get(step_id), self._jobs.get(step_id)
                if task is not None and job is not None:
                    task.status = CANCELLED  # as recorded by the replica that stopped it
                    job.cancel()

    def _renew(self, step_ids: list[str]) -> list[str]:
        """Renew each lease (off the event loop); returns the tasks whose stored record says they finished."""
        stopped = []
        for step_id in step_ids:
            stored = self.store.load(step_id)
            if stored is not None and stored.finished:
                stopped.append(step_id)
            else:
                self.store.renew(step_id, self.lease_s)
        return stopped

    def stop(self, step_id: str) -> bool:
        """Cancel a pending or processing task (its synthesis slot is freed as its generation stops).
        False when it had already finished."""
        task = self.get(step_id)
        if task is None or not self._finish(task, CANCELLED):
            return False
        job = self._jobs.get(step_id)
        if job is not None:
            job.cancel()
        return True

    def stop_all(self) -> int:
        """Cancel every pending or processing task (of every replica, in a shared store); returns how many."""
        return sum(self.stop(task.step_id) for task in self.store.tasks() if not task.finished)

    async def close(self) -> None:
        """Service shutdown: unfinished tasks become failed (interrupted) and their jobs are cancelled."""
        if self._renewals is not None:
            self._renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewals
        jobs = list(self._jobs.values())
        for task in list(self._running.values()):
            self._finish(task, FAILED, INTERRUPTED)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
