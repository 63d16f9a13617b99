"""The real service for the service tests: `python -m cosyapp serve` with uvicorn on a loopback port, running
the CosyVoice2 backend on the tiny model (CosyVoice3's for its own tests), configured through COSYAPP_* environment
variables.

One slot and one queue place (max_concurrent=1, max_queue=1) so that the load tests can fill it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service_live import DEFAULT_PROMPT, resampled_prompt, running_service, service_env


@pytest.fixture(scope="session")
def live_service(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("service")
    with running_service(workdir, service_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir)) as service:
        yield service


@pytest.fixture(scope="session")
def cosyvoice3_service(tiny_cosyvoice3_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The service with `[model] backend = "cosyvoice3"` on the tiny CosyVoice3 model (same limits as live_service)."""
    workdir = tmp_path_factory.mktemp("service_cv3")
    with running_service(workdir, service_env(workdir, "cosyvoice3", tiny_cosyvoice3_dir)) as service:
        yield service


@pytest.fixture(scope="session")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client's working folder holding the files the seed's examples upload."""
    folder = tmp_path_factory.mktemp("client")
    resampled_prompt(folder / "my_voice.wav", 16000)
    resampled_prompt(folder / "asset" / "paimon_prompt.wav", 22050)
    shutil.copy(DEFAULT_PROMPT, folder / "zero_shot_prompt.wav")
    return folder


