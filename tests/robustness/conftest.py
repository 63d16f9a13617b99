"""The service the robustness tests attack: CosyVoice2 and Fish side by side on the tiny models (so every route
answers), one synthesis slot and four queue places (so a test can fill the queue), and short header and body
timeouts (so a trickling client is cut off within the test's patience)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cosyapp.robustness.service import CampaignModels, campaign_service

# The service's [server] header_timeout_s and body_timeout_s.
TIMEOUTS_S = {"header": 1.0, "body": 2.0}


@pytest.fixture(scope="session")
def campaign_models(tiny_cosyvoice2_dir: Path, tiny_fish_dir: Path) -> CampaignModels:
    return CampaignModels(tiny_cosyvoice2_dir, tiny_fish_dir)


@pytest.fixture(scope="session")
def robust_service(campaign_models: CampaignModels, tmp_path_factory: pytest.TempPathFactory):
    settings = {"COSYAPP_ENGINE_MAX_CONCURRENT": "1", "COSYAPP_ENGINE_MAX_QUEUE": "4",
                "COSYAPP_SERVER_HEADER_TIMEOUT_S": str(TIMEOUTS_S["header"]),
                "COSYAPP_SERVER_BODY_TIMEOUT_S": str(TIMEOUTS_S["body"])}
    with campaign_service(campaign_models, tmp_path_factory.mktemp("robust"), **settings) as service:
        yield service


@pytest.fixture()
def timeouts_s() -> dict[str, float]:
    return TIMEOUTS_S


@pytest.fixture()
def client(robust_service) -> httpx.Client:
    with httpx.Client(base_url=robust_service.url, timeout=60, trust_env=False) as client:
        yield client
