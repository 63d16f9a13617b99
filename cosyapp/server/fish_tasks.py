"""The Fish API's asynchronous generation tasks: their records on disk and the asyncio jobs that run them.

A task is a folder `<root>/<step_id>/` holding `task.json` (status, timestamps, error, audio format) and, once
completed, `result.<format>`. Writes are atomic (temporary file, fsync, rename) and the result is on disk
before the record says completed, so a restart loses no completed task. Tasks that were pending or processing
when the service stopped come back failed ("interrupted"): their inputs (inline reference audio) are not kept.

States: pending (created; preparing the voice or waiting for a synthesis slot) -> processing (generating) ->
completed | failed | cancelled. A finished task may be replaced by a new one with the same step_id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

from cosyapp.server.errors import as_api_error

log = logging.getLogger("cosyapp.tasks")

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})
# step ids become folder names: no separators, no leading dot.
STEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RECORD_FILE = "task.json"
INTERRUPTED = "interrupted: the service stopped before the task finished"

# A job gets a callback to report that it holds a synthesis slot, and returns the encoded result file.
Job = Callable[[Callable[[], None]], Awaitable[bytes]]


@dataclass
class Task:
    step_id: str
    format: str
    status: str
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class TaskConflict(Exception):
    """A task with this step_id is still pending or processing."""


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _failure_message(exc: BaseException) -> str:
    """What the task status shows: the client-facing message of expected errors, nothing internal otherwise."""
    error = as_api_error(exc) if isinstance(exc, Exception) else None
    if error is not None:
        return error.detail
    log.error("async task failed", exc_info=exc)
    return f"internal error ({type(exc).__name__}); see the service log"


class TaskManager:
    def __init__(self, root: str | Path, keep_s: float = 0.0) -> None:
        """`keep_s`: finished tasks older than this many seconds are deleted (0: kept forever)."""
        self.root = Path(root)
        self.keep_s = keep_s
        self._tasks: dict[str, Task] = {}
        self._jobs: dict[str, asyncio.Task] = {}
        self._load()

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for record in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            try:
                task = Task(**json.loads(record.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable task record %s: %s", record, e)
                continue
            self._tasks[task.step_id] = task
            if not task.finished:
                self._finish(task, FAILED, INTERRUPTED)
        self._sweep()

    def _folder(self, step_id: str) -> Path:
        return self.root / step_id

    def _save(self, task: Task) -> None:
        folder = self._folder(task.step_id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / RECORD_FILE, json.dumps(asdict(task)).encode("utf-8"))

    def _finish(self, task: Task, status: str, error: str | None = None) -> bool:
        """Move an unfinished task to a final status; False when it had already finished."""
        if task.finished:
            return False
        task.status, task.error, task.completed_at = status, error, time.time()
        self._save(task)
        return True

    def _sweep(self) -> None:
        """Delete finished tasks older than `keep_s`, and leftovers of interrupted writes."""
        if self.keep_s <= 0:
            return
        cutoff = time.time() - self.keep_s
        for step_id, task in list(self._tasks.items()):
            if task.finished and (task.completed_at or task.created_at) < cutoff:
                del self._tasks[step_id]
                shutil.rmtree(self._folder(step_id), ignore_errors=True)

    def get(self, step_id: str) -> Task | None:
        return self._tasks.get(step_id) if STEP_ID.fullmatch(step_id) else None

    def result_path(self, task: Task) -> Path:
        return self._folder(task.step_id) / f"result.{task.format}"

    def start(self, step_id: str, audio_format: str, job: Job, abandon: Callable[[], None]) -> Task:
        """Record a new pending task and start `job` for it. Raises TaskConflict while one with this id runs.

        `abandon` is called if the task is stopped before its job ever ran (the job then cannot clean up after
        itself, e.g. give back the engine place taken for it)."""
        old = self._tasks.get(step_id)
        if old is not None and not old.finished:
            raise TaskConflict(f"task {step_id!r} is still {old.status}; stop it or use another step_id")
        self._sweep()
        if old is not None:
            shutil.rmtree(self._folder(step_id), ignore_errors=True)
        task = Task(step_id=step_id, format=audio_format, status=PENDING, created_at=time.time())
        self._save(task)
        self._tasks[step_id] = task
        runner = asyncio.create_task(self._run(task, job), name=f"task-{step_id}")
        # `_run` swallows cancellation once it runs, so a cancelled runner is one whose job never started.
        runner.add_done_callback(lambda done: abandon() if done.cancelled() else None)
        self._jobs[step_id] = runner
        return task

    def _started(self, task: Task) -> None:
        if task.status == PENDING:
            task.status, task.started_at = PROCESSING, time.time()
            self._save(task)

    async def _run(self, task: Task, job: Job) -> None:
        try:
            data = await job(lambda: self._started(task))
            await asyncio.to_thread(_write_atomic, self.result_path(task), data)
            self._finish(task, COMPLETED)
        except asyncio.CancelledError:
            pass  # stop() or close() already recorded why
        except Exception as e:
            self._finish(task, FAILED, _failure_message(e))
        finally:
            if self._jobs.get(task.step_id) is asyncio.current_task():
                del self._jobs[task.step_id]

    def stop(self, step_id: str) -> bool:
        """Cancel a pending or processing task (its synthesis slot is freed as its generation stops).
        False when it had already finished."""
        task = self._tasks[step_id]
        if not self._finish(task, CANCELLED):
            return False
        job = self._jobs.get(step_id)
        if job is not None:
            job.cancel()
        return True

    def stop_all(self) -> int:
        """Cancel every pending or processing task; returns how many."""
        return sum(self.stop(step_id) for step_id, task in list(self._tasks.items()) if not task.finished)

    async def close(self) -> None:
        """Service shutdown: unfinished tasks become failed (interrupted) and their jobs are cancelled."""
        jobs = list(self._jobs.values())
        for task in self._tasks.values():
            self._finish(task, FAILED, INTERRUPTED)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
