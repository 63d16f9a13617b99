"""Acceptance 1: the seed's cURL examples, verbatim apart from the host, against the real service; streaming
(first bytes before the synthesis has finished); /health and /model_info as the seed specifies."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from seed_curl_examples import SEED_STATUS_COMMANDS, seed_curl_commands
from service_live import assert_pcm


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("comment, command", seed_curl_commands(), ids=lambda v: v[:40])
def test_seed_curl_example(live_service, client_dir: Path, comment: str, command: str):
    before = live_service.stats()
    output = client_dir / "output.wav"
    output.unlink(missing_ok=True)
    command = command.replace("<server-ip>:50000", f"127.0.0.1:{live_service.port}")
    result = subprocess.run(["bash", "-c", command], cwd=client_dir, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    samples = assert_pcm(output.read_bytes())
    after = live_service.stats()
    assert after["completed"] == before["completed"] + 1, (comment, after)
    assert after["rejected"] == before["rejected"] and after["failed"] == before["failed"]
    assert samples > 0.1 * 24000  # at least 0.1 s of audio


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (scripts/setup.sh installs it)")
def test_seed_status_commands(live_service):
    health, model_info = (
        json.loads(subprocess.run(["bash", "-c", c.replace("localhost:50000", f"127.0.0.1:{live_service.port}")],
                                  capture_output=True, check=True, timeout=60).stdout)
        for c in SEED_STATUS_COMMANDS
    )
    assert health == {"status": "ok", "model_type": "CosyVoice2"}
    assert model_info["model_type"] == "CosyVoice2"
    assert Path(model_info["model_dir"]).resolve() == Path(live_service.env["COSYAPP_MODEL_MODEL_DIR"]).resolve()
    assert model_info["default_instruction"] == "你是一位热情友好的餐馆店员,说话温柔亲切,语气礼貌专业。<|endofprompt|>"
    assert model_info["usage"] == "Use /synthesize endpoint with 'instruction' parameter (CosyVoice2/3)"
    assert model_info["endpoint"] == "/synthesize"
    assert model_info["sample_rate"] == 24000 and model_info["sample_format"] == "s16le"
    assert model_info["channels"] == 1
    assert set(model_info["modes"]) == {"zero_shot", "cross_lingual", "instruct2"}
    assert isinstance(model_info["speakers"], list)


def test_pcm_headers_and_first_bytes_before_synthesis_ends(live_service):
    # Four short sentences, synthesized one after the other. A random tiny model may also stop a sentence after a
    # handful of tokens, and then the whole request can end before its first bytes are read: fixed_length gives
    # every sentence the same 50 tokens (2 s), so the request is still running when its first chunk arrives.
    text = "欢迎光临。请坐。谢谢。再见。"
    started = time.perf_counter()
    with httpx.stream("POST", f"{live_service.url}/synthesize", data={"text": text, "fixed_length": "50"},
                      timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["x-sample-rate"] == "24000"
        assert response.headers["x-channels"] == "1"
        assert response.headers["x-sample-format"] == "s16le"
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.perf_counter() - started
        stats_at_first_bytes = live_service.stats()
        body = first + b"".join(chunks)
        finished_at = time.perf_counter() - started
    assert_pcm(body)
    # The engine was still synthesizing this request when its first bytes had already arrived.
    assert stats_at_first_bytes["active"] == 1, stats_at_first_bytes
    assert len(first) < len(body)
    assert first_at < finished_at
    print(f"time to first bytes {first_at:.2f} s, whole stream {finished_at:.2f} s, "
          f"{len(body) / 2 / 24000:.2f} s of audio")


def test_wav_format_and_request_log_line(live_service):
    import io

    import soundfile

    response = httpx.post(f"{live_service.url}/synthesize", data={"text": "你好。", "format": "wav"}, timeout=300)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
    assert rate == 24000 and samples.ndim == 1 and len(samples) > 0
    assert response.content[44:] == samples.astype("<i2").tobytes()
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while f"request id={request_id}" not in live_service.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in live_service.log().splitlines() if f"request id={request_id}" in line)
    for field in ("status=200", "mode=instruct2", "text_chars=3", "ttfb_ms=", "audio_s=", "rtf=", "result=ok"):
        assert field in line, line
