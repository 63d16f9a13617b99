"""The Fish API's parts without a served model: the task store, the audio encoders, the API key check, the
config keys and the CLI additions. (Upstream's HTTP bodies are compared in tests/parity/test_fish_http.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cosyapp.audio import AUDIO_MEDIA_TYPES, encode_audio
from cosyapp.config import ConfigError, load_settings
from cosyapp.server.auth import ApiKeyMiddleware, bearer_token
from cosyapp.server.fish_tasks import INTERRUPTED, TaskConflict, TaskManager
from service_live import REPO_ROOT

# ------------------------------------------------------------------------------------------- task store


def _run(coroutine):
    return asyncio.run(coroutine)


async def _wait(manager: TaskManager, step_id: str, statuses: set[str]) -> None:
    for _ in range(200):
        if manager.get(step_id).status in statuses:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{step_id} stayed {manager.get(step_id).status}")


def test_tasks_run_persist_and_survive_a_restart(tmp_path: Path):
    async def scenario() -> None:
        manager = TaskManager(tmp_path)
        gate = asyncio.Event()

        async def finishes(started) -> bytes:
            started()
            return b"audio bytes"

        async def hangs(started) -> bytes:
            started()
            await gate.wait()
            return b"never"

        async def fails(started) -> bytes:
            raise RuntimeError("a bug")  # an unexpected error: its text stays in the service log

        manager.start("done", "wav", finishes, abandon=lambda: None)
        manager.start("running", "mp3", hangs, abandon=lambda: None)
        manager.start("broken", "wav", fails, abandon=lambda: None)
        await _wait(manager, "done", {"completed"})
        await _wait(manager, "running", {"processing"})
        await _wait(manager, "broken", {"failed"})
        assert manager.result_path(manager.get("done")).read_bytes() == b"audio bytes"
        assert manager.get("broken").error == "internal error (RuntimeError); see the service log"
        with pytest.raises(TaskConflict):
            manager.start("running", "wav", finishes, abandon=lambda: None)
        assert manager.get("../etc") is None

    _run(scenario())
    # A new manager (a restarted service) finds the completed task and fails the one that was cut off.
    manager = TaskManager(tmp_path)
    assert manager.get("done").status == "completed" and manager.get("done").completed_at is not None
    assert manager.result_path(manager.get("done")).read_bytes() == b"audio bytes"
    running = manager.get("running")
    assert running.status == "failed" and running.error == INTERRUPTED
    assert json.loads((tmp_path / "running" / "task.json").read_text())["status"] == "failed"


def test_stop_before_the_job_runs_calls_abandon(tmp_path: Path):
    async def scenario() -> list[str]:
        manager = TaskManager(tmp_path)
        calls: list[str] = []

        async def job(started) -> bytes:
            calls.append("ran")
            return b""

        manager.start("early", "wav", job, abandon=lambda: calls.append("abandoned"))
        assert manager.stop("early") is True  # before the event loop ever ran the job
        await asyncio.sleep(0.05)
        assert manager.get("early").status == "cancelled"
        assert manager.stop("early") is False
        return calls

    assert _run(scenario()) == ["abandoned"]


def test_stop_all_and_close(tmp_path: Path):
    async def scenario() -> TaskManager:
        manager = TaskManager(tmp_path)
        cancelled: list[str] = []

        def hangs(step_id: str):
            async def job(started) -> bytes:
                started()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    cancelled.append(step_id)  # the job sees the cancellation (and frees its slot)
                    raise
                return b""
            return job

        for step_id in ("a", "b"):
            manager.start(step_id, "wav", hangs(step_id), abandon=lambda: None)
        await _wait(manager, "b", {"processing"})
        assert manager.stop_all() == 2 and manager.stop_all() == 0
        await asyncio.sleep(0.05)
        assert sorted(cancelled) == ["a", "b"]
        manager.start("c", "wav", hangs("c"), abandon=lambda: None)
        await _wait(manager, "c", {"processing"})
        await manager.close()
        assert manager.get("c").status == "failed" and cancelled[-1] == "c"
        return manager

    _run(scenario())


def test_finished_tasks_expire(tmp_path: Path):
    async def scenario() -> None:
        manager = TaskManager(tmp_path, keep_s=0.2)

        async def job(started) -> bytes:
            return b"x"

        manager.start("old", "wav", job, abandon=lambda: None)
        await _wait(manager, "old", {"completed"})
        time.sleep(0.3)
        manager.start("new", "wav", job, abandon=lambda: None)  # creating a task sweeps expired ones
        await _wait(manager, "new", {"completed"})
        assert manager.get("old") is None and not (tmp_path / "old").exists()

    _run(scenario())


# ----------------------------------------------------------------------------------------- audio formats


@pytest.mark.parametrize("audio_format", sorted(AUDIO_MEDIA_TYPES))
def test_encode_audio_formats(audio_format: str):
    rate = 44100
    samples = (0.5 * np.sin(np.arange(rate // 2) * 2 * np.pi * 440 / rate)).astype(np.float32)
    data = encode_audio(samples, rate, audio_format)
    if audio_format == "pcm":
        decoded = np.frombuffer(data, "<i2").astype(np.float32) / 32768
        expected_rate = rate
    else:
        decoded, expected_rate = soundfile.read(io.BytesIO(data), dtype="float32")
        assert expected_rate == (48000 if audio_format == "opus" else rate)
    assert abs(decoded.shape[0] / expected_rate - 0.5) < 0.1
    if audio_format in ("wav", "pcm", "flac"):  # lossless 16-bit
        ints = np.round(decoded.astype(np.float64) * 32768)
        floor = np.floor(samples.astype(np.float64) * 32768)
        assert np.abs(ints - floor).max() <= 1
        if audio_format != "flac":  # libsndfile's WAV conversion (upstream's bodies): floor but for tiny values
            assert np.mean(ints == floor) > 0.99


def test_encode_audio_rejects_unknown_formats():
    with pytest.raises(ValueError, match="unknown audio format"):
        encode_audio(np.zeros(10, np.float32), 44100, "aac")


# ---------------------------------------------------------------------------------------------- API key


def test_bearer_token_parsing():
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(b"abc") is None


def test_api_key_middleware():
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/health", ok), Route("/health", ok), Route("/v1/tts", ok)],
                    middleware=[Middleware(ApiKeyMiddleware, api_key="s3cret")])
    client = TestClient(app)
    assert client.get("/v1/health").text == "ok" and client.get("/health").text == "ok"
    assert client.get("/v1/tts", headers={"Authorization": "Bearer s3cret"}).text == "ok"
    for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret2"}):
        answer = client.get("/v1/tts", headers=headers)
        assert answer.status_code == 401 and set(answer.json()) == {"detail"}


# ----------------------------------------------------------------------------------------- config and CLI


def test_config_keys(tmp_path: Path):
    settings = load_settings(None, env={"COSYAPP_MODEL_EXTRA_BACKEND": "fish", "COSYAPP_SERVER_API_KEY": "k",
                                        "COSYAPP_LIMITS_MAX_TEXT_CHARS": "100", "COSYAPP_STORAGE_DATA_DIR": "/srv"})
    assert list(settings.served_backends()) == ["cosyvoice2", "fish"]
    assert settings.server.api_key == "k" and settings.limits.max_text_chars == 100
    assert settings.storage.tasks_dir == Path("/srv/tasks")
    assert settings.backend_options("fish") == {"check_every": 4, "penalty_main_history": False}
    with pytest.raises(ConfigError, match="extra_backend"):
        load_settings(None, env={"COSYAPP_MODEL_EXTRA_BACKEND": "cosyvoice2"})
    with pytest.raises(ConfigError, match="extra_backend"):
        load_settings(None, env={"COSYAPP_MODEL_EXTRA_BACKEND": "nope"})
    with pytest.raises(ConfigError, match="max_text_chars"):
        load_settings(None, env={"COSYAPP_LIMITS_MAX_TEXT_CHARS": "0"})


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosyapp", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def test_models_pull_fish_needs_a_token(tmp_path: Path):
    env = {name: value for name, value in os.environ.items() if not name.startswith(("COSYAPP_", "HF_"))}
    env.update({"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    result = _cli("models", "pull", "fish", "--dir", str(tmp_path / "model"), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "fishaudio/openaudio-s1-mini is gated and no Hugging Face token is set" in result.stderr
    assert "HF_TOKEN" in result.stderr and "[hub] hf_token" in result.stderr
    assert not (tmp_path / "model").exists()  # nothing was started
    # With a token (here from the config's [hub] hf_token) the download starts; this hub is unreachable.
    env.update({"COSYAPP_HUB_HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"})
    result = _cli("models", "pull", "fish", "--dir", str(tmp_path / "model"), env=env)
    assert result.returncode == 1 and "download of fishaudio/openaudio-s1-mini failed" in result.stderr


def test_serve_takes_an_api_key():
    result = _cli("serve", "--help", env=dict(os.environ))
    assert result.returncode == 0 and "--api-key" in result.stdout
