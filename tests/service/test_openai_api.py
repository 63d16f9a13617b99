"""The OpenAI speech API (`routes/openai_api.py`) on the real service, driven by OpenAI's own Python SDK where
it can be, and by plain HTTP for the streaming shapes and the errors."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import soundfile

from service_live import DEFAULT_PROMPT, LONG_TEXT, assert_pcm, wait_idle

TEXT = "欢迎光临!请问您需要什么?"
SPEAKER = "openai_narrator"


@pytest.fixture(scope="module")
def client(live_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_service.url}/v1", api_key="not-checked", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def speaker(live_service) -> str:
    result = subprocess.run([sys.executable, "-m", "cosyapp", "speakers", "add", SPEAKER, "--wav", str(DEFAULT_PROMPT),
                             "--text", "欢迎光临，请问您需要点什么？"], env=live_service.env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return SPEAKER


def _speech(service, **body) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/audio/speech", json=body, timeout=300)


def test_sdk_streams_pcm(live_service, client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=TEXT,
                                                            response_format="pcm") as response:
        assert response.headers["x-sample-rate"] == "24000"
        pieces = list(response.iter_bytes())
        request_id = response.headers["x-request-id"]
    assert assert_pcm(b"".join(pieces)) > 24000 // 10
    line = live_service.log_line(request_id)
    # OpenAI's built-in voice names mean the default voice, with the default instruction (instruct2).
    assert "mode=instruct2 " in line and "result=ok" in line, line


@pytest.mark.parametrize("audio_format, container", [(None, "MP3"), ("opus", "OGG"), ("flac", "FLAC")])
def test_sdk_gets_whole_files(client: openai.OpenAI, audio_format: str | None, container: str) -> None:
    options = {} if audio_format is None else {"response_format": audio_format}  # None: OpenAI's default, mp3
    audio = client.audio.speech.create(model="tts-1", voice="nova", input=TEXT, **options).content
    info = soundfile.info(io.BytesIO(audio))
    assert info.format == container and info.channels == 1
    assert info.duration > 0.1


def test_wav_streams_with_a_header(live_service) -> None:
    response = _speech(live_service, model="gpt-4o-mini-tts", voice="default", input=TEXT, response_format="wav")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    body = response.content
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
    assert int.from_bytes(body[24:28], "little") == 24000
    assert_pcm(body[44:])


def test_sse_carries_base64_pcm_then_done(live_service) -> None:
    events = []
    with httpx.stream("POST", f"{live_service.url}/v1/audio/speech", timeout=300,
                      json={"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm",
                            "stream_format": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [event["type"] for event in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    assert len(events) >= 2
    assert_pcm(b"".join(base64.b64decode(event["audio"]) for event in events[:-1]))


def test_registered_speaker_and_instructions(live_service, client: openai.OpenAI, speaker: str) -> None:
    voices = httpx.get(f"{live_service.url}/v1/audio/voices", timeout=10).json()
    assert speaker in voices["voices"] and "alloy" in voices["default_aliases"]
    for voice in (speaker, {"id": speaker}):
        response = _speech(live_service, model="tts-1", voice=voice, input=TEXT, response_format="pcm")
        assert response.status_code == 200, response.text
        # The stored transcript makes it zero-shot, as on /synthesize.
        assert "mode=zero_shot " in live_service.log_line(response.headers["x-request-id"])
    response = _speech(live_service, model="cosyvoice2", voice=speaker, input=TEXT, response_format="pcm",
                       instructions="用开心的语气说")
    assert response.status_code == 200, response.text
    assert "mode=instruct2 " in live_service.log_line(response.headers["x-request-id"])


def test_models_lists_the_loaded_backends(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["cosyvoice2"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "tts-1", "voice": "alloy"}, 400, "input is missing"),
    ({"model": "tts-1", "voice": "alloy", "input": "  "}, 400, "input is missing"),
    ({"model": "tts-1", "voice": "nobody_here", "input": TEXT}, 400, "nobody_here"),
    ({"model": "tts-1", "voice": 7, "input": TEXT}, 400, "voice must be a string"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "aac"}, 400, "response_format"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "speed": 1.5}, 400, "speed 1.5 is not supported"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "speed": "fast"}, 400, "speed must be a number"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "stream_format": "sse"}, 400, "response_format pcm"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "stream_format": "video"}, 400, "stream_format"),
    ({"model": "fish", "voice": "alloy", "input": TEXT}, 400, "'fish' is not loaded"),
    ({"model": "tts-1", "voice": "alloy", "input": TEXT, "volume": 2}, 400, "unknown field(s) volume"),
    ({"model": "tts-1", "voice": "alloy", "input": "字" * 5000}, 400, "input is too long"),
])
def test_bad_requests_get_a_json_reason(live_service, body: dict, status: int, words: str) -> None:
    response = _speech(live_service, **body)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_sdk_raises_the_reason(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="nobody_here"):
        client.audio.speech.create(model="tts-1", voice="nobody_here", input=TEXT)


@pytest.mark.parametrize("content, content_type, status, words", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b"input=hi", "application/x-www-form-urlencoded", 415, "application/json"),
])
def test_bodies_that_are_not_a_json_object(live_service, content: bytes, content_type: str, status: int,
                                           words: str) -> None:
    response = httpx.post(f"{live_service.url}/v1/audio/speech", content=content,
                          headers={"content-type": content_type}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_a_client_leaving_before_its_file_is_ready_cancels_the_synthesis(live_service) -> None:
    before = wait_idle(live_service)
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "mp3"}).encode()
    host, port = urlsplit(live_service.url).hostname, urlsplit(live_service.url).port
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while live_service.stats()["active"] == 0:  # wait until it synthesizes, then hang up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    after = wait_idle(live_service)
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["completed"] == before["completed"]
