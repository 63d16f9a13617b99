"""The Flash-TTS API (seed 003, routes/flash_api.py) on the real service, with the requests the seed's Python
examples send (the same payloads, encodings and uploads), and the OpenAI route's voice cloning from base64."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import requests
import soundfile

from service_live import DEFAULT_PROMPT, assert_pcm

ROLE = "flash_male"
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "max_tokens": 2048}


@pytest.fixture(scope="module")
def role(live_service) -> str:
    """A role added as the seed's add_speaker example does (multipart: name, reference_text, audio_file)."""
    with open(DEFAULT_PROMPT, "rb") as audio:
        response = requests.post(f"{live_service.url}/add_speaker", files={"audio_file": audio},
                                 data={"name": ROLE, "reference_text": "欢迎光临，请问您需要点什么？"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "role": ROLE}
    return ROLE


def assert_mp3(body: bytes) -> None:
    info = soundfile.info(io.BytesIO(body))
    assert info.format == "MP3" and info.samplerate == 24000 and info.duration > 0.1


def test_speak_as_a_role(live_service, role: str) -> None:
    payload = {"name": role, "text": "Hello, world!", "pitch": "moderate", "speed": "moderate", **SAMPLING,
               "stream": False, "response_format": "mp3"}
    response = requests.post(f"{live_service.url}/speak", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    assert_mp3(response.content)
    # The role's transcript makes it zero-shot, as a speaker on /synthesize.
    assert "mode=zero_shot " in live_service.log_line(response.headers["x-request-id"])


def test_clone_from_base64_in_a_urlencoded_form(live_service) -> None:
    b64 = base64.b64encode(DEFAULT_PROMPT.read_bytes()).decode()
    payload = {"text": "Clone this voice", "reference_audio": b64, **SAMPLING, "stream": False,
               "response_format": "mp3"}
    response = requests.post(f"{live_service.url}/clone_voice", data=payload, timeout=300)
    assert response.status_code == 200, response.text
    assert_mp3(response.content)
    assert "mode=cross_lingual " in live_service.log_line(response.headers["x-request-id"])


def test_clone_from_an_uploaded_file_with_its_transcript(live_service) -> None:
    with open(DEFAULT_PROMPT, "rb") as ref:
        response = requests.post(f"{live_service.url}/clone_voice", files={"reference_audio_file": ref},
                                 data={"text": "Clone audio", "temperature": 0.9, "response_format": "wav",
                                       "reference_text": "欢迎光临，请问您需要点什么？"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.content[:4] == b"RIFF"
    assert "mode=zero_shot " in live_service.log_line(response.headers["x-request-id"])


def test_streamed_clone_plays_as_it_arrives(live_service) -> None:
    b64 = base64.b64encode(DEFAULT_PROMPT.read_bytes()).decode()
    data = {"text": "欢迎光临，今天的特价菜是红烧肉。", "reference_audio": b64, "stream": True, "response_format": "wav"}
    with requests.post(f"{live_service.url}/clone_voice", data=data, stream=True, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["x-sample-rate"] == "24000"
        body = b"".join(response.iter_content(1024))
    assert body[:4] == b"RIFF"
    assert_pcm(body[44:])


def test_openai_voice_given_as_base64_is_cloned(live_service) -> None:
    client = openai.OpenAI(base_url=f"{live_service.url}/v1", api_key="not-needed", max_retries=0, timeout=300)
    audio_base64 = base64.b64encode(DEFAULT_PROMPT.read_bytes()).decode("utf-8")
    with client.audio.speech.with_streaming_response.create(model="spark", voice=audio_base64,
                                                            input="Hello, I am here.") as response:
        body = response.read()
        request_id = response.headers["x-request-id"]
    assert_mp3(body)
    assert "mode=cross_lingual " in live_service.log_line(request_id)


def test_roles_are_listed_and_deleted(live_service, role: str) -> None:
    assert role in httpx.get(f"{live_service.url}/audio_roles", timeout=10).json()["roles"]
    info = httpx.get(f"{live_service.url}/server_info", timeout=10).json()
    assert info["sample_rate"] == 24000 and role in info["roles"] and info["model"]
    again = requests.post(f"{live_service.url}/add_speaker", data={"name": role},
                          files={"audio_file": DEFAULT_PROMPT.read_bytes()}, timeout=300)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    deleted = requests.post(f"{live_service.url}/delete_speaker", data={"name": role}, timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"success": True, "role": role}
    assert role not in httpx.get(f"{live_service.url}/audio_roles", timeout=10).json()["roles"]
    gone = requests.post(f"{live_service.url}/delete_speaker", data={"name": role}, timeout=30)
    assert gone.status_code == 404


@pytest.mark.parametrize("path, kwargs, status, words", [
    ("/speak", {"json": {"name": "nobody", "text": "hi"}}, 400, "unknown speaker 'nobody'"),
    ("/speak", {"json": {"text": "hi"}}, 400, "name is missing"),
    ("/speak", {"json": {"name": "x", "text": "hi", "pitch": "high"}}, 400, "pitch high is not supported"),
    ("/speak", {"json": {"name": "x", "text": "hi", "speed": "warp"}}, 400, "speed must be one of"),
    ("/speak", {"json": {"name": "x", "text": "hi", "top_k": "many"}}, 400, "top_k must be a whole number"),
    ("/speak", {"json": {"name": "x", "text": "hi", "stream": True, "response_format": "mp3"}}, 400,
     "stream: true sends wav or pcm"),
    ("/speak", {"json": {"name": "x", "text": "hi", "response_format": "aac"}}, 400, "response_format"),
    ("/speak", {"json": {"name": "x", "text": "hi", "voice": "y"}}, 400, "unknown field(s) voice"),
    ("/speak", {"data": {"name": "x", "text": "hi"}}, 415, "application/json"),
    ("/clone_voice", {"data": {"text": "hi"}}, 400, "give the voice to clone"),
    ("/clone_voice", {"data": {"text": "hi", "reference_audio": "https://example.com/a.wav"}}, 400,
     "URLs are not fetched"),
    ("/clone_voice", {"data": {"text": "hi", "reference_audio": "not base64!"}}, 400, "not valid base64"),
    ("/clone_voice", {"data": {"text": "hi", "reference_audio": "AAAA", "stream": "maybe"}}, 400,
     "stream must be true or false"),
    ("/add_speaker", {"data": {"name": "bad name!"}, "files": {"audio_file": b"x"}}, 400, "invalid speaker id"),
    ("/add_speaker", {"data": {"name": "ok_name"}, "files": {"audio_file": b"x", "latent_file": b"y"}}, 400,
     "latent_file"),
    ("/add_speaker", {"data": {"name": "ok_name"}}, 400, "give the speaker's recording"),
])
def test_bad_requests_get_a_json_reason(live_service, path: str, kwargs: dict, status: int, words: str) -> None:
    response = requests.post(f"{live_service.url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
