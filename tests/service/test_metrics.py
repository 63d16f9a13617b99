"""GET /metrics: Prometheus' text format, moved by the requests the service answers, behind the API key.

In-process apps (Starlette's TestClient) on the tiny Fish model: two apps in one process keep separate counts."""

from __future__ import annotations

import time
from pathlib import Path

import ormsgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from cosyapp.config import load_settings
from service_live import DEFAULT_PROMPT

API_KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSGPACK = {**AUTH, "content-type": "application/msgpack"}


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    answer = client.get("/metrics", headers=AUTH)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def app_settings(tiny_fish_dir: Path):
    return lambda data_dir: load_settings(None, env={
        "COSYAPP_MODEL_BACKEND": "fish", "COSYAPP_MODEL_MODEL_DIR": str(tiny_fish_dir), "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_MODEL_WARMUP": "false", "COSYAPP_STORAGE_DATA_DIR": str(data_dir),
        "COSYAPP_SERVER_API_KEY": API_KEY})


def wait_until_loaded(client: TestClient) -> None:
    for _ in range(1200):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the model did not load")


def test_metrics_need_the_api_key(app_settings, tmp_path: Path) -> None:
    from cosyapp.server import create_app

    client = TestClient(create_app(app_settings(tmp_path)))  # no lifespan: answers while nothing is loaded
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    metrics = samples(client)
    assert value(metrics, "cosyapp_requests_total", route="/metrics", status="401") == 2


def test_a_request_moves_the_counters_and_histograms(app_settings, tmp_path: Path) -> None:
    from cosyapp.server import create_app

    reference = {"audio": DEFAULT_PROMPT.read_bytes(), "text": "A reference."}
    request = {"text": "Hello.", "max_new_tokens": 8, "seed": 1, "format": "pcm", "streaming": True,
               "references": [reference]}
    with TestClient(create_app(app_settings(tmp_path / "one"))) as client:
        wait_until_loaded(client)
        before = samples(client)
        for _ in range(2):  # the second request finds the reference voice prepared
            answer = client.post("/v1/tts", content=ormsgpack.packb(request), headers=MSGPACK)
            assert answer.status_code == 200 and answer.content
        bad = client.post("/v1/tts", content=ormsgpack.packb({**request, "top_p": 5}), headers=MSGPACK)
        assert bad.status_code == 400
        after = samples(client)
        with TestClient(create_app(app_settings(tmp_path / "two"))) as other:
            wait_until_loaded(other)
            elsewhere = samples(other)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("cosyapp_requests_total", route="/v1/tts", status="200") == 2
    assert moved("cosyapp_requests_total", route="/v1/tts", status="400") == 1
    assert moved("cosyapp_first_audio_seconds_count", backend="fish") == 2
    assert moved("cosyapp_real_time_factor_count", backend="fish") == 2
    assert moved("cosyapp_audio_seconds_total", backend="fish") > 0
    assert moved("cosyapp_voice_cache_misses_total", backend="fish") == 1
    assert moved("cosyapp_voice_cache_hits_total", backend="fish") == 1
    assert moved("cosyapp_engine_stage_seconds_count", backend="fish", stage="fish_lm") > 0
    assert moved("cosyapp_engine_stage_seconds_count", backend="fish", stage="fish_codec") > 0
    assert value(after, "cosyapp_active_streams", backend="fish") == 0
    assert value(after, "cosyapp_queued_streams", backend="fish") == 0
    # Another app in the same process counts only its own requests.
    assert value(elsewhere, "cosyapp_requests_total", route="/v1/tts", status="200") == 0
    assert value(elsewhere, "cosyapp_first_audio_seconds_count", backend="fish") == 0
