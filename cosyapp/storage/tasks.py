"""Async task records and their results, and their local-disk store.

A task is a folder `<root>/<step_id>/` holding `task.json` (status, timestamps, error, audio format) and, once
completed, `result.<format>`. Writes are atomic (temporary file, fsync, rename) and the result is on disk
before the record says completed, so a restart loses no completed task.

States: pending (created; preparing the voice or waiting for a synthesis slot) -> processing (generating) ->
completed | failed | cancelled. The task manager (cosyapp/server/fish_tasks.py) runs the jobs; a store only keeps
records, results and, in a shared store, the leases that say which tasks a live process still runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("cosyapp.tasks")

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})
# step ids become folder names and store keys: no separators, no leading dot.
STEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RECORD_FILE = "task.json"


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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> Task:
        return cls(**json.loads(data))


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (temporary file in the same folder, fsync, rename)."""
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


class DiskTaskStore:
    """Task folders under `root`, for one service process: it holds no leases, so a task left unfinished in it
    was cut off by the process stopping (`leases` False: the manager fails such tasks when it starts)."""

    leases = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _folder(self, step_id: str) -> Path:
        return self.root / step_id

    def result_path(self, task: Task) -> Path:
        return self._folder(task.step_id) / f"result.{task.format}"

    def tasks(self) -> list[Task]:
        if not self.root.is_dir():
            return []
        found = []
        for record in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            try:
                found.append(Task.from_json(record.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable task record %s: %s", record, e)
        return found

    def load(self, step_id: str) -> Task | None:
        try:
            return Task.from_json((self._folder(step_id) / RECORD_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("ignoring unreadable task record of %s: %s", step_id, e)
            return None

    def save(self, task: Task) -> None:
        folder = self._folder(task.step_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / RECORD_FILE, task.to_json())

    def finish(self, task: Task) -> bool:
        """Save `task` (now finished) unless its stored record has finished already; False then."""
        stored = self.load(task.step_id)
        if stored is not None and stored.finished:
            return False
        self.save(task)
        return True

    def delete(self, step_id: str) -> None:
        shutil.rmtree(self._folder(step_id), ignore_errors=True)

    def write_result(self, task: Task, data: bytes) -> None:
        self._folder(task.step_id).mkdir(parents=True, exist_ok=True)
        write_atomic(self.result_path(task), data)

    def read_result(self, task: Task) -> bytes | None:
        try:
            return self.result_path(task).read_bytes()
        except FileNotFoundError:
            return None

    def renew(self, step_id: str, seconds: float) -> None:
        """No leases on one box: the process that runs a task is the one that reads it."""

    def alive(self, step_id: str) -> bool:
        return True

    def release(self, step_id: str) -> None:
        """No leases on one box."""
