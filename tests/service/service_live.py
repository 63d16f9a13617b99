"""Helpers of the service tests: run `python -m cosyapp serve` as a subprocess and check PCM bodies."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from cosyapp.service_process import ServiceStartError, free_port, start_service

# free_port: for the tests that put the port into a service's environment before starting it.
__all__ = ["DEFAULT_PROMPT", "LONG_TEXT", "REPO_ROOT", "LiveService", "assert_pcm", "free_port", "resampled_prompt",
           "running_service", "service_env", "wait_idle"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT = REPO_ROOT / "asset" / "zero_shot_prompt.wav"

# Long enough that synthesizing all of it takes far longer than the tests wait after disconnecting.
LONG_TEXT = "。".join(["欢迎光临本店", "今天的特价菜是红烧肉和清蒸鱼", "请问您几位用餐", "这边请坐",
                      "我们的服务员马上为您点菜", "祝您用餐愉快"] * 8) + "。"


@dataclass
class LiveService:
    url: str
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def log_line(self, request_id: str) -> str:
        """The log line of one request (written when it ends: waits up to 5 s for it)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if f"request id={request_id}" in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line for request {request_id}")


def service_env(workdir: Path, backend: str, model_dir: Path) -> dict[str, str]:
    """The environment of a test service on the tiny `backend` model in `model_dir`, keeping its data in `workdir`."""
    return {
        **os.environ,
        "COSYAPP_CONFIG": str(REPO_ROOT / "config.toml"),
        "COSYAPP_SERVER_HOST": "127.0.0.1",
        "COSYAPP_SERVER_PORT": str(free_port()),
        "COSYAPP_MODEL_BACKEND": backend,
        "COSYAPP_MODEL_MODEL_DIR": str(model_dir),
        "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_ENGINE_MAX_CONCURRENT": "1",
        "COSYAPP_ENGINE_MAX_QUEUE": "1",
        "COSYAPP_STORAGE_DATA_DIR": str(workdir / "data"),
        "OMP_NUM_THREADS": "2",
    }


@contextlib.contextmanager
def running_service(workdir: Path, env: dict[str, str], *args: str) -> Iterator[LiveService]:
    """`python -m cosyapp serve ARGS` in `workdir` until the block ends (stopped with SIGTERM, like systemd).

    `env` is its whole environment: COSYAPP_SERVER_PORT says where it listens, COSYAPP_STORAGE_DATA_DIR where
    it keeps its data. Its log goes to `workdir`; a failed start fails the test and quotes the whole log."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = int(env["COSYAPP_SERVER_PORT"])
    try:
        with start_service(port, env, workdir / f"service-{port}.log", serve_args=args, cwd=workdir) as process:
            yield LiveService(process.url, port, Path(env["COSYAPP_STORAGE_DATA_DIR"]), process.log_path, env)
    except ServiceStartError as e:
        pytest.fail(str(e), pytrace=False)


def resampled_prompt(path: Path, sample_rate: int) -> None:
    """The default prompt recording at another sample rate (the seed recommends 16 kHz or 22050 Hz)."""
    samples, rate = soundfile.read(DEFAULT_PROMPT, dtype="float32")
    out = torchaudio.functional.resample(torch.from_numpy(samples), rate, sample_rate).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(out, -1, 1), sample_rate, subtype="PCM_16")


def assert_pcm(body: bytes) -> int:
    """Non-empty PCM s16le: a whole number of samples, not a JSON error. Returns the sample count."""
    assert len(body) > 0, "empty audio"
    assert not is_json_object(body), f"got an error body instead of audio: {body[:200]!r}"
    assert len(body) % 2 == 0, f"{len(body)} bytes is not a whole number of 16-bit samples"
    return len(body) // 2


def wait_idle(service, timeout: float = 30.0) -> dict:
    """Wait until the service has no request in flight; its /stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = service.stats()
        if stats["in_flight"] == 0 and stats["active"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def is_json_object(body: bytes) -> bool:
    """Whether `body` is a JSON object (an error answer); audio may start with "{" too."""
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:  # UnicodeDecodeError included
        return False
