"""Issue 4: one service, two backends (one engine each). `[model] backend = cosyvoice2` with
`extra_backend = fish`: /synthesize picks the backend with its `backend` field (prompt_wav + prompt_text become
a Fish reference; an instruction is a clear 400 for Fish), the OpenAI speech API by its `model`, and the Fish
API runs on the extra backend."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fish_service import fish_env, running_service
from service_live import DEFAULT_PROMPT, assert_pcm, free_port


@pytest.fixture(scope="module")
def service(tiny_cosyvoice2_dir: Path, tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("two_backends")
    env = fish_env(free_port(), tiny_fish_dir, workdir / "data")
    env.update({"COSYAPP_MODEL_BACKEND": "cosyvoice2", "COSYAPP_MODEL_MODEL_DIR": str(tiny_cosyvoice2_dir),
                "COSYAPP_MODEL_EXTRA_BACKEND": "fish",
                "COSYAPP_MODEL_EXTRA_MODEL_DIR": env["COSYAPP_MODEL_MODEL_DIR"]})
    with running_service(workdir, env) as live:
        yield live


def synthesize(service, files: dict | None = None, **fields) -> httpx.Response:
    return httpx.post(f"{service.url}/synthesize", data=fields, files=files, timeout=120)


def test_synthesize_with_the_fish_backend(service):
    with open(DEFAULT_PROMPT, "rb") as prompt:
        answer = synthesize(service, files={"prompt_wav": prompt}, text="Hello there.",
                            prompt_text="希望你以后能够做的比我还好呦。", backend="fish")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-sample-rate"] == "44100"
    assert assert_pcm(answer.content) % 2048 == 0  # whole Fish codec frames


def test_synthesize_defaults_to_the_configured_backend(service):
    answer = synthesize(service, text="你好。")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-sample-rate"] == "24000"
    answer = synthesize(service, text="你好。", backend="cosyvoice2", instruction="用开心的语气说。")
    assert answer.status_code == 200 and answer.headers["x-sample-rate"] == "24000"


def test_synthesize_rejects_what_fish_cannot_do(service):
    answer = synthesize(service, text="Hello.", backend="fish", instruction="Speak happily.")
    assert answer.status_code == 400 and "instruction" in answer.json()["detail"]
    answer = synthesize(service, text="Hello.", backend="nope")
    assert answer.status_code == 400 and "not loaded" in answer.json()["detail"]


def test_fish_api_runs_on_the_extra_backend(service):
    assert httpx.get(f"{service.url}/v1/health").json() == {"status": "ok"}
    answer = httpx.post(f"{service.url}/v1/tts", json={"text": "Hello.", "seed": 1, "max_new_tokens": 8}, timeout=120)
    assert answer.status_code == 200 and answer.content[:4] == b"RIFF"


def test_openai_speech_picks_the_backend_by_model(service):
    models = httpx.get(f"{service.url}/v1/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == ["cosyvoice2", "fish"]
    for model, rate in (("fish", "44100"), ("tts-1", "24000"), ("cosyvoice2", "24000")):
        answer = httpx.post(f"{service.url}/v1/audio/speech", timeout=120,
                            json={"model": model, "voice": "alloy", "input": "Hello.", "response_format": "pcm"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-sample-rate"] == rate
        assert_pcm(answer.content)

