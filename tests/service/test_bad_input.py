"""Acceptance 2: every bad input gets a 4xx JSON {"detail": ...}, before any audio, and the service stays up."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile

from service_live import DEFAULT_PROMPT


def _wav(seconds: float, sample_rate: int = 24000) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sample_rate,
                    format="WAV", subtype="PCM_16")
    return buffer.getvalue()


PROMPT = DEFAULT_PROMPT.read_bytes()
CORRUPT_WAV = PROMPT[:12] + b"\x00garbage" * 40  # RIFF/WAVE magic, then no valid chunks

# (case id, request kwargs for httpx, expected status, text expected in the detail)
CASES = [
    ("missing text", dict(files={"instruction": (None, "你好<|endofprompt|>")}), 400, "missing required field 'text'"),
    ("empty text", dict(files={"text": (None, "   ")}), 400, "text is empty"),
    ("text too long", dict(data={"text": "好" * 2001}), 400, "too long"),
    ("non-audio upload", dict(data={"text": "你好"}, files={"prompt_wav": ("a.wav", b"this is not audio at all")}),
     400, "not a readable audio file"),
    ("corrupt wav", dict(data={"text": "你好"}, files={"prompt_wav": ("c.wav", CORRUPT_WAV)}), 400, "prompt_wav"),
    ("empty upload", dict(data={"text": "你好"}, files={"prompt_wav": ("e.wav", b"")}), 400, "prompt_wav is empty"),
    ("prompt too long", dict(data={"text": "你好"}, files={"prompt_wav": ("l.wav", _wav(31.0, 16000))}),
     400, "too long"),
    ("prompt too short", dict(data={"text": "你好"}, files={"prompt_wav": ("s.wav", _wav(0.1))}), 400, "too short"),
    ("prompt_wav not a file", dict(files={"text": (None, "你好"), "prompt_wav": (None, "./my_voice.wav")}),
     400, "must be a file upload"),
    ("unknown speaker", dict(data={"text": "你好", "speaker": "nobody"}), 400, "unknown speaker 'nobody'"),
    ("speaker path traversal", dict(data={"text": "你好", "speaker": "../../etc/passwd"}), 400, "invalid speaker id"),
    ("speaker and prompt_wav", dict(data={"text": "你好", "speaker": "x"}, files={"prompt_wav": ("p.wav", PROMPT)}),
     400, "not both"),
    ("unknown field", dict(data={"text": "你好", "voice": "x"}), 400, "unknown field(s) voice"),
    ("bad format", dict(data={"text": "你好", "format": "mp3"}), 400, "format must be one of pcm, wav"),
    ("duplicate text", dict(files=[("text", (None, "a")), ("text", (None, "b"))]), 400, "given 2 times"),
    ("oversize body", dict(data={"text": "你好"}, files={"prompt_wav": ("big.wav", b"\x00" * (11 * 2**20))}),
     413, "too large"),
    ("json body", dict(json={"text": "你好"}), 415, "unsupported content type 'application/json'"),
    ("no body", dict(), 415, "unsupported content type"),
    ("two files", dict(files=[("text", (None, "你好")), ("prompt_wav", ("a.wav", PROMPT)),
                              ("prompt_wav", ("b.wav", PROMPT))]), 400, "files"),
]


@pytest.mark.parametrize("case, kwargs, status, detail", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_json(live_service, case, kwargs, status, detail):
    response = httpx.post(f"{live_service.url}/synthesize", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail"} and detail in body["detail"], body
    assert "Traceback" not in response.text


def test_oversize_chunked_body_is_refused_while_reading(live_service):
    def body():
        yield b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhi\r\n"
        yield b"--x\r\nContent-Disposition: form-data; name=\"prompt_wav\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(12):  # 12 MiB, more than max_upload_mb; no Content-Length is sent
            yield b"\x00" * 2**20
        yield b"\r\n--x--\r\n"

    response = httpx.post(f"{live_service.url}/synthesize", content=body(), timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "too large" in response.json()["detail"]


@pytest.mark.parametrize("method, path, status", [("GET", "/synthesize", 405), ("GET", "/nope", 404),
                                                  ("POST", "/health", 405)])
def test_wrong_routes_get_json(live_service, method, path, status):
    response = httpx.request(method, f"{live_service.url}{path}", timeout=10)
    assert response.status_code == status and "detail" in response.json()


def test_service_is_still_healthy_after_the_matrix(live_service):
    stats = live_service.stats()
    assert httpx.get(f"{live_service.url}/health", timeout=10).json()["status"] == "ok"
    assert stats["active"] == 0 and stats["in_flight"] == 0
    response = httpx.post(f"{live_service.url}/synthesize", data={"text": "你好。"}, timeout=300)
    assert response.status_code == 200 and len(response.content) > 0
    assert "Traceback" not in live_service.log()
