"""Helpers of the service tests: run `python -m cosyapp serve` as a subprocess and check PCM bodies."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import torch
import torchaudio

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT = REPO_ROOT / "asset" / "zero_shot_prompt.wav"
STARTUP_TIMEOUT_S = 300


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"service exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 200:
                return
            if health.json().get("status") == "error":
                pytest.fail(f"service failed to load the model: {health.json()}\n{log_path.read_text()}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"service not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def resampled_prompt(path: Path, sample_rate: int) -> None:
    """The default prompt recording at another sample rate (the seed recommends 16 kHz or 22050 Hz)."""
    samples, rate = soundfile.read(DEFAULT_PROMPT, dtype="float32")
    out = torchaudio.functional.resample(torch.from_numpy(samples), rate, sample_rate).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(out, -1, 1), sample_rate, subtype="PCM_16")


def assert_pcm(body: bytes) -> int:
    """Non-empty PCM s16le: a whole number of samples, not a JSON error. Returns the sample count."""
    assert len(body) > 0, "empty audio"
    assert not body.startswith(b"{"), f"got an error body instead of audio: {body[:200]!r}"
    assert len(body) % 2 == 0, f"{len(body)} bytes is not a whole number of 16-bit samples"
    return len(body) // 2
