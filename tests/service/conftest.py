"""The real service for the service tests: `python -m cosyapp serve` with uvicorn on a loopback port, running
the CosyVoice2 backend on the tiny model, configured through COSYAPP_* environment variables.

One slot and one queue place (max_concurrent=1, max_queue=1) so that the load tests can fill it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service_live import DEFAULT_PROMPT, REPO_ROOT, free_port, resampled_prompt, running_service


@pytest.fixture(scope="session")
def live_service(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("service")
    port = free_port()
    env = {
        **os.environ,
        "COSYAPP_CONFIG": str(REPO_ROOT / "config.toml"),
        "COSYAPP_SERVER_HOST": "127.0.0.1",
        "COSYAPP_SERVER_PORT": str(port),
        "COSYAPP_MODEL_MODEL_DIR": str(tiny_cosyvoice2_dir),
        "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_ENGINE_MAX_CONCURRENT": "1",
        "COSYAPP_ENGINE_MAX_QUEUE": "1",
        "COSYAPP_STORAGE_DATA_DIR": str(workdir / "data"),
        "OMP_NUM_THREADS": "2",
    }
    with running_service(workdir, env) as service:
        yield service


@pytest.fixture(scope="session")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client's working folder holding the files the seed's examples upload."""
    folder = tmp_path_factory.mktemp("client")
    resampled_prompt(folder / "my_voice.wav", 16000)
    resampled_prompt(folder / "asset" / "paimon_prompt.wav", 22050)
    shutil.copy(DEFAULT_PROMPT, folder / "zero_shot_prompt.wav")
    return folder


