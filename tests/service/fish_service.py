"""Helpers of the Fish API service tests: `python -m cosyapp serve` running a Fish model (the tests pass the
`tiny_fish_dir` fixture's) on a loopback port, configured through COSYAPP_* variables like
tests/service/conftest.py does for CosyVoice2."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from service_live import REPO_ROOT, running_service

# running_service: the Fish tests start their services with it, configured by fish_env.
__all__ = ["fish_env", "running_service", "wait_for_status"]


def fish_env(port: int, model_dir: Path, data_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of a service whose [model] backend is fish; `settings` are further COSYAPP_* variables."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("COSYAPP_")},
        "COSYAPP_CONFIG": str(REPO_ROOT / "config.toml"),
        "COSYAPP_SERVER_HOST": "127.0.0.1",
        "COSYAPP_SERVER_PORT": str(port),
        "COSYAPP_MODEL_BACKEND": "fish",
        "COSYAPP_MODEL_MODEL_DIR": str(model_dir),
        "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_MODEL_WARMUP": "false",
        "COSYAPP_STORAGE_DATA_DIR": str(data_dir),
        "OMP_NUM_THREADS": "2",
        **settings,
    }


def wait_for_status(url: str, step_id: str, statuses: set[str], headers: dict[str, str] | None = None,
                    timeout_s: float = 120.0) -> dict:
    """Poll /get_task_status until the task reaches one of `statuses`; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = httpx.get(f"{url}/get_task_status/{step_id}", headers=headers, timeout=10).json()
        if answer.get("status") in statuses or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)
