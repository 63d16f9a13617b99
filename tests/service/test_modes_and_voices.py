"""Mode selection, registered speakers, the seed's Python (form-urlencoded) examples and the voice cache, on the
real service."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from service_live import DEFAULT_PROMPT, assert_pcm


def _synthesize(service, data: dict, files: dict | None = None) -> tuple[bytes, str]:
    response = httpx.post(f"{service.url}/synthesize", data=data, files=files, timeout=300)
    assert response.status_code == 200, response.text
    assert_pcm(response.content)
    return response.content, service.log_line(response.headers["x-request-id"])


ANCHOR = "你是一位专业的新闻主播,声音清晰,语调平稳,充满权威感。<|endofprompt|>"


@pytest.mark.parametrize("data, upload, mode", [
    ({"text": "欢迎光临!请问您需要什么?"}, False, "instruct2"),  # seed example 1 (requests, urlencoded)
    ({"text": "今天的新闻报道到此结束。", "instruction": ANCHOR}, False, "instruct2"),  # seed example 2
    # Seed example 3; the missing <|endofprompt|> is added.
    ({"text": "感谢您的来电,我们会尽快处理。", "instruction": "你是一位温柔的客服人员,说话柔和体贴。"}, True,
     "instruct2"),
    ({"text": "原神,启动!"}, True, "cross_lingual"),  # seed example 4
    ({"text": "原神,启动!", "prompt_text": "欢迎光临，请问您需要点什么？"}, True, "zero_shot"),
    ({"text": "你好。", "prompt_text": "欢迎光临，请问您需要点什么？"}, False, "zero_shot"),  # default voice
])
def test_mode_rules(live_service, data: dict, upload: bool, mode: str):
    files = {"prompt_wav": ("voice.wav", DEFAULT_PROMPT.read_bytes())} if upload else None
    _, line = _synthesize(live_service, data, files)
    assert f"mode={mode} " in line and "result=ok" in line, line


def test_uploads_are_prepared_once_per_content(live_service):
    audio = DEFAULT_PROMPT.read_bytes()
    _synthesize(live_service, {"text": "你好。"}, {"prompt_wav": ("a.wav", audio)})
    before = live_service.stats()
    _synthesize(live_service, {"text": "你好。"}, {"prompt_wav": ("b.wav", audio)})  # same bytes, other name
    after = live_service.stats()
    assert after["voice_cache_hits"] == before["voice_cache_hits"] + 1
    assert after["voice_cache_misses"] == before["voice_cache_misses"]


def test_registered_speaker(live_service):
    result = subprocess.run([sys.executable, "-m", "cosyapp", "speakers", "add", "clerk", "--wav", str(DEFAULT_PROMPT),
                             "--text", "欢迎光临，请问您需要点什么？"], env=live_service.env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clerk" in httpx.get(f"{live_service.url}/model_info", timeout=10).json()["speakers"]
    _, line = _synthesize(live_service, {"text": "今天天气真好", "speaker": "clerk"})
    assert "mode=zero_shot " in line  # the stored transcript makes it zero-shot
    _, line = _synthesize(live_service, {"text": "今天天气真好", "speaker": "clerk", "instruction": "用开心的语气说"})
    assert "mode=instruct2 " in line
    _, line = _synthesize(live_service, {"text": "今天天气真好", "speaker": "clerk", "format": "wav"})
    assert "result=ok" in line


def test_prompts_set_default_applies_to_the_running_service(live_service):
    def cosyapp(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "cosyapp", *args], env=live_service.env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

    instruction = "你是一位温和的老师,说话清晰缓慢。<|endofprompt|>"
    cosyapp("prompts", "set-default", "--wav", str(DEFAULT_PROMPT), "--instruction", instruction)
    try:
        assert httpx.get(f"{live_service.url}/model_info", timeout=10).json()["default_instruction"] == instruction
        before = live_service.stats()
        _, line = _synthesize(live_service, {"text": "你好。"})
        assert "mode=instruct2 " in line
        assert live_service.stats()["voice_cache_misses"] == before["voice_cache_misses"] + 1  # the new voice
    finally:
        cosyapp("prompts", "reset")
    info = httpx.get(f"{live_service.url}/model_info", timeout=10).json()
    assert info["default_instruction"].startswith("你是一位热情友好的餐馆店员")
