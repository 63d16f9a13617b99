"""The service with `[model] backend = "cosyvoice3"` on the tiny CosyVoice3 model: the seed's cURL examples and
status commands, the OpenAI and Flash-TTS routes, and a broken model directory.

The random tiny model stops at random, so the /synthesize examples ask for a fixed number of LM tokens
(`fixed_length`, the API's benchmarking aid) and the other routes get a short sentence."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import requests
import soundfile

from cosyapp.service_process import ServiceStartError, start_service
from seed_curl_examples import SEED_STATUS_COMMANDS, seed_curl_commands
from service_live import DEFAULT_PROMPT, assert_pcm, service_env

# Long enough that the shortest utterance the random LM may stop at (2 tokens per text token) still makes audio.
TEXT = "欢迎光临!请问您需要什么?"
FIXED_LENGTH = 60  # LM tokens per sentence: 2.4 s of audio, more than one streamed chunk
ROLE = "cv3_role"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def with_fixed_length(command: str) -> str:
    return command.replace("  --output", f'  -F "fixed_length={FIXED_LENGTH}" \\\n  --output')


@needs_curl
@pytest.mark.parametrize("comment, command", seed_curl_commands(), ids=lambda v: v[:40])
def test_seed_curl_example(cosyvoice3_service, client_dir: Path, comment: str, command: str) -> None:
    before = cosyvoice3_service.stats()
    output = client_dir / "output_cv3.wav"
    output.unlink(missing_ok=True)
    command = with_fixed_length(command).replace("<server-ip>:50000", f"127.0.0.1:{cosyvoice3_service.port}")
    result = subprocess.run(["bash", "-c", command.replace("output.wav", output.name)], cwd=client_dir,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    samples = assert_pcm(output.read_bytes())
    after = cosyvoice3_service.stats()
    assert after["completed"] == before["completed"] + 1, (comment, after)
    assert after["failed"] == before["failed"]
    assert samples >= 0.9 * FIXED_LENGTH * 2 * 480  # 2 mel frames per token, 480 samples per frame


@pytest.mark.parametrize("fields, mode", [
    ({}, "instruct2"),  # the default instruction and voice
    ({"instruction": "你是一位活泼开朗的主持人,声音充满活力。<|endofprompt|>"}, "instruct2"),
    ({"prompt_text": "欢迎光临，请问您需要点什么？"}, "zero_shot"),
], ids=["default-instruction", "custom-instruction", "zero-shot"])
def test_synthesize_modes(cosyvoice3_service, fields: dict, mode: str) -> None:
    files = {"prompt_wav": ("p.wav", DEFAULT_PROMPT.read_bytes())} if "prompt_text" in fields else None
    response = httpx.post(f"{cosyvoice3_service.url}/synthesize", timeout=300, files=files,
                          data={"text": "你好。", "fixed_length": str(FIXED_LENGTH), **fields})
    assert response.status_code == 200, response.text
    assert assert_pcm(response.content) > 0
    line = cosyvoice3_service.log_line(response.headers["x-request-id"])
    assert f"mode={mode} " in line and "result=ok" in line, line


def test_prompt_wav_clone(cosyvoice3_service, client_dir: Path) -> None:
    audio = (client_dir / "asset" / "paimon_prompt.wav").read_bytes()
    response = httpx.post(f"{cosyvoice3_service.url}/synthesize", timeout=300, files={"prompt_wav": ("p.wav", audio)},
                          data={"text": "原神,启动!", "fixed_length": str(FIXED_LENGTH)})
    assert response.status_code == 200, response.text
    assert_pcm(response.content)
    assert "mode=cross_lingual " in cosyvoice3_service.log_line(response.headers["x-request-id"])


@needs_curl
def test_seed_status_commands(cosyvoice3_service) -> None:
    health, model_info = (
        json.loads(subprocess.run(["bash", "-c", c.replace("localhost:50000", f"127.0.0.1:{cosyvoice3_service.port}")],
                                  capture_output=True, check=True, timeout=60).stdout)
        for c in SEED_STATUS_COMMANDS
    )
    assert health == {"status": "ok", "model_type": "CosyVoice3"}
    assert model_info["model_type"] == "CosyVoice3"
    assert Path(model_info["model_dir"]).resolve() == Path(cosyvoice3_service.env["COSYAPP_MODEL_MODEL_DIR"]).resolve()
    assert model_info["default_instruction"].endswith("<|endofprompt|>")
    assert model_info["sample_rate"] == 24000
    assert set(model_info["modes"]) == {"zero_shot", "cross_lingual", "instruct2"}


def test_openai_streams_pcm(cosyvoice3_service) -> None:
    body = {"model": "cosyvoice3", "voice": "alloy", "input": TEXT, "response_format": "pcm",
            "instructions": "用温柔的语气说。"}
    with httpx.stream("POST", f"{cosyvoice3_service.url}/v1/audio/speech", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-sample-rate"] == "24000"
        pcm = b"".join(response.iter_bytes())
        request_id = response.headers["x-request-id"]
    assert_pcm(pcm)
    assert "mode=instruct2 " in cosyvoice3_service.log_line(request_id)


def test_openai_flac_file(cosyvoice3_service) -> None:
    response = httpx.post(f"{cosyvoice3_service.url}/v1/audio/speech", timeout=300,
                          json={"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "flac"})
    assert response.status_code == 200, response.text
    info = soundfile.info(io.BytesIO(response.content))
    assert info.format == "FLAC" and info.samplerate == 24000 and info.duration > 0


def test_flash_speak_as_a_role(cosyvoice3_service) -> None:
    with open(DEFAULT_PROMPT, "rb") as audio:
        added = requests.post(f"{cosyvoice3_service.url}/add_speaker", files={"audio_file": audio},
                              data={"name": ROLE, "reference_text": "欢迎光临，请问您需要点什么？"}, timeout=300)
    assert added.status_code == 200, added.text
    payload = {"name": ROLE, "text": TEXT, "stream": True, "response_format": "pcm"}
    with requests.post(f"{cosyvoice3_service.url}/speak", json=payload, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        assert response.headers["x-sample-rate"] == "24000"
        assert_pcm(b"".join(response.iter_content(1024)))
    assert "mode=zero_shot " in cosyvoice3_service.log_line(response.headers["x-request-id"])


@pytest.fixture(scope="module")
def corrupt_model_dir(tiny_cosyvoice3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("corrupt_cv3") / "model"
    shutil.copytree(tiny_cosyvoice3_dir, model_dir)
    (model_dir / "flow.pt").write_bytes(b"\x00not a checkpoint" * 8)
    return model_dir


def test_models_verify_names_the_corrupt_file(corrupt_model_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cosyapp", "models", "verify", str(corrupt_model_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "flow.pt" in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def test_health_names_the_corrupt_file(corrupt_model_dir: Path, tmp_path: Path) -> None:
    env = service_env(tmp_path, "cosyvoice3", corrupt_model_dir)
    with pytest.raises(ServiceStartError, match=r"failed to load its model: .*flow\.pt"):
        with start_service(int(env["COSYAPP_SERVER_PORT"]), env, tmp_path / "service.log", cwd=tmp_path):
            pass
