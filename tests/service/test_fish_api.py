"""Issue 4, acceptance 2: the Fish Speech API of seed 001 on a real uvicorn with the tiny Fish model.

* Every request example of the seed (Python msgpack/JSON/reference/streaming/VQGAN/reference-management/async
  examples, the cURL commands, the JavaScript fetch) runs unchanged but for the URL, as a separate program
  (tests/service/fish_client stands in for the client-side `fish_speech` and `pyaudio` imports). The service's
  API key is the seed's placeholder `YOUR_API_KEY`, so the examples' headers are right as written.
* Every endpoint's error cases return the seed's status codes with a `{"detail": ...}` body.

Upstream's HTTP bodies on the golden model are compared in tests/parity/test_fish_http.py, and the examples'
text against the seed in tests/parity/test_seeds.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import ormsgpack
import pytest
import soundfile

from fish_client import seed_examples as seed
from fish_service import fish_env, running_service, wait_for_status
from service_live import DEFAULT_PROMPT, free_port

CLIENT_LIBS = Path(__file__).resolve().parent / "fish_client"
API_KEY = "YOUR_API_KEY"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MSGPACK = {**AUTH, "content-type": "application/msgpack"}
MAX_TEXT_LENGTH = 500
MAX_UPLOAD_MB = 1  # small, so that the size limits are cheap to test
SAMPLE_RATE = 44100
# The seed's examples continue one session: later blocks use the first block's imports.
SESSION_IMPORTS = "import requests\nimport ormsgpack\nfrom fish_speech.utils.schema import ServeTTSRequest, " \
                  "ServeReferenceAudio\n"
REFERENCE_TEXT = "这是参考文本"


@pytest.fixture(scope="module")
def service(tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("fish_service")
    env = fish_env(free_port(), tiny_fish_dir, workdir / "data", COSYAPP_SERVER_API_KEY=API_KEY,
                   COSYAPP_LIMITS_MAX_TEXT_CHARS=str(MAX_TEXT_LENGTH), COSYAPP_ENGINE_MAX_CONCURRENT="2",
                   COSYAPP_LIMITS_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB))
    with running_service(workdir, env) as live:
        yield live


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the examples run in, holding the files they read."""
    folder = tmp_path_factory.mktemp("fish_client_dir")
    shutil.copy(DEFAULT_PROMPT, folder / "ref_audio.wav")
    shutil.copy(DEFAULT_PROMPT, folder / "audio.wav")
    (folder / "ref_text.txt").write_text(REFERENCE_TEXT, encoding="utf-8")
    return folder


def _with_url(code: str, service) -> str:
    return code.replace(seed.SEED_URL, service.url)


def run_python(code: str, service, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(CLIENT_LIBS), **(env or {})}
    result = subprocess.run([sys.executable, "-c", _with_url(code, service)], cwd=cwd, env=environment,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def run_shell(command: str, service, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", _with_url(command, service)], cwd=cwd, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def ensure_reference(service, reference_id: str, client_dir: Path) -> None:
    if reference_id in httpx.get(f"{service.url}/v1/references/list", headers=AUTH).json()["reference_ids"]:
        return
    with open(client_dir / "ref_audio.wav", "rb") as audio:
        answer = httpx.post(f"{service.url}/v1/references/add", files={"audio": audio},
                            data={"id": reference_id, "text": REFERENCE_TEXT}, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text


def remove_reference(service, reference_id: str) -> None:
    httpx.request("DELETE", f"{service.url}/v1/references/delete", json={"reference_id": reference_id}, headers=AUTH)


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert samples.ndim == 1 and samples.size > 0
    return samples, rate


# ------------------------------------------------------------------------------------- the seed's examples


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_health_curl(service, client_dir):
    result = run_shell(seed.HEALTH_CURL, service, client_dir)
    assert json.loads(result.stdout) == {"status": "ok"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_reference_management_examples(service, client_dir):
    remove_reference(service, "my_voice")
    added = run_python(seed.REFERENCES_ADD, service, client_dir).stdout.decode()
    assert "'success': True" in added and "Reference voice 'my_voice' added successfully" in added
    assert "'reference_id': 'my_voice'" in added
    listed = json.loads(run_shell(seed.REFERENCES_LIST_CURL, service, client_dir).stdout)
    assert listed["success"] is True and "my_voice" in listed["reference_ids"]
    assert listed["message"] == f"Found {len(listed['reference_ids'])} reference voices"
    again = run_python(seed.REFERENCES_ADD, service, client_dir).stdout.decode()
    assert "already exists" in again  # 409, printed by the example's response.json()

    remove_reference(service, "new_name")
    ensure_reference(service, "old_name", client_dir)
    renamed = run_python(seed.REFERENCES_UPDATE, service, client_dir).stdout.decode()
    assert "Reference voice renamed from 'old_name' to 'new_name' successfully" in renamed
    ids = httpx.get(f"{service.url}/v1/references/list", headers=AUTH).json()["reference_ids"]
    assert "new_name" in ids and "old_name" not in ids

    deleted = run_python(seed.REFERENCES_DELETE, service, client_dir).stdout.decode()
    assert "Reference voice 'my_voice' deleted successfully" in deleted
    assert "my_voice" not in httpx.get(f"{service.url}/v1/references/list", headers=AUTH).json()["reference_ids"]
    # The registry the CLI manages holds them: one folder per reference.
    assert (service.data_dir / "speakers" / "new_name" / "prompt.wav").is_file()


@pytest.mark.parametrize("example", ["TTS_MSGPACK", "TTS_JSON"])
def test_seed_tts_examples(service, client_dir, example):
    ensure_reference(service, "my_voice", client_dir)
    output = client_dir / "output.wav"
    output.unlink(missing_ok=True)
    run_python(getattr(seed, example), service, client_dir)
    samples, rate = read_audio(output.read_bytes())
    assert rate == SAMPLE_RATE and samples.size % 2048 == 0  # whole codec frames


def test_seed_tts_with_references_example(service, client_dir):
    check = "\nprint(response.status_code, response.headers['content-type'], response.content[:4])\n"
    result = run_python(SESSION_IMPORTS + seed.TTS_REFERENCES + check, service, client_dir)
    assert result.stdout.decode().strip() == "200 audio/wav b'RIFF'"


def test_seed_streaming_example(service, client_dir):
    played = client_dir / "played.raw"
    played.unlink(missing_ok=True)
    Path(f"{played}.writes").unlink(missing_ok=True)
    run_python(SESSION_IMPORTS + seed.TTS_STREAMING, service, client_dir, env={"FISH_PYAUDIO_OUT": str(played)})
    audio = played.read_bytes()
    writes = [int(n) for n in Path(f"{played}.writes").read_text().split()]
    assert sum(writes) == len(audio) and len(writes) > 1  # consumed chunk by chunk
    # A WAV stream: header (unknown length) + s16le PCM at 44.1 kHz; the PCM alone is what upstream sent.
    assert audio[:4] == b"RIFF" and audio[36:40] == b"data"
    assert int.from_bytes(audio[24:28], "little") == SAMPLE_RATE
    assert (len(audio) - 44) % 2 == 0 and len(audio) > 44


def test_seed_vqgan_examples(service, client_dir):
    placeholder = "tokens=[[[1, 2, 3, ...], ...], ...]"
    assert placeholder in seed.VQGAN_DECODE
    check = "\nprint(json.dumps({'shape': [len(tokens), len(tokens[0]), len(tokens[0][0])], " \
            "'audio_bytes': [len(a) for a in audios], 'codes': tokens[0]}))\n"
    # The decode example continues the encode example: its placeholder becomes the encoded tokens.
    code = "import json\n" + seed.VQGAN_ENCODE + seed.VQGAN_DECODE.replace(placeholder, "tokens=tokens") + check
    result = json.loads(run_python(code, service, client_dir).stdout)
    (n, codebooks, frames) = result["shape"]
    assert (n, codebooks) == (1, 10) and frames > 0
    assert result["audio_bytes"] == [frames * 2048 * 2]  # float16 PCM, every frame decoded


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_async_task_examples(service, client_dir):
    ensure_reference(service, "my_voice", client_dir)
    created = run_python(seed.ASYNC_GENERATE, service, client_dir).stdout.decode()
    assert created.strip() == "Task created: task_001, Status: pending"
    assert wait_for_status(service.url, "task_001", {"completed", "failed"}, AUTH)["status"] == "completed"
    status = json.loads(run_shell(seed.TASK_STATUS_CURL, service, client_dir).stdout)
    assert status["success"] is True and status["status"] == "completed" and status["error"] is None
    assert status["download_url"] == "/download_result/task_001"
    assert status["created_at"] <= status["started_at"] <= status["completed_at"]
    (client_dir / "output.mp3").unlink(missing_ok=True)
    run_shell(seed.DOWNLOAD_CURL, service, client_dir)
    samples, rate = read_audio((client_dir / "output.mp3").read_bytes())
    assert rate == SAMPLE_RATE
    stopped = run_python(seed.STOP_ASYNC_TASK, service, client_dir).stdout.decode()
    assert "'step_id': 'task_001'" in stopped and "already completed" in stopped
    assert run_python(seed.STOP_GENERATION, service, client_dir).stdout.decode().strip() == \
        "{'success': True, 'message': 'Stopped 0 task(s)'}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_curl_section(service, client_dir):
    health, tts, listing = seed.CURL_EXAMPLES.strip().split("\n\n")
    assert json.loads(run_shell(health, service, client_dir).stdout) == {"status": "ok"}
    samples, rate = read_audio(run_shell(tts, service, client_dir).stdout)
    assert rate == SAMPLE_RATE
    assert json.loads(run_shell(listing, service, client_dir).stdout)["success"] is True


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_seed_javascript_example(service, client_dir):
    ensure_reference(service, "my_voice", client_dir)
    browser = "globalThis.played = [];\n" \
              "globalThis.Audio = class { constructor(url) { this.url = url; } play() { played.push(this.url); } };\n"
    call = "\ngenerateSpeech('测试文本', 'my_voice').then(() => console.log(JSON.stringify(played)));\n"
    script = client_dir / "example.mjs"
    script.write_text(browser + _with_url(seed.JAVASCRIPT, service) + call, encoding="utf-8")
    result = subprocess.run(["node", str(script)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    (url,) = json.loads(result.stdout)
    assert url.startswith("blob:")


@pytest.mark.parametrize("audio_format,media_type,rate", [("mp3", "audio/mpeg", 44100), ("opus", "audio/ogg", 48000),
                                                           ("flac", "audio/flac", 44100), ("wav", "audio/wav", 44100)])
def test_tts_formats(service, audio_format, media_type, rate):
    request = {"text": "Hello, world!", "format": audio_format, "seed": 16, "max_new_tokens": 16}
    answer = httpx.post(f"{service.url}/v1/tts?format=json", json=request, headers=AUTH, timeout=120)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == media_type
    assert answer.headers["content-disposition"] == f"attachment; filename=audio.{audio_format}"
    samples, sample_rate = read_audio(answer.content)
    assert sample_rate == rate


def test_streaming_pcm_is_the_same_audio_as_wav(service):
    request = {"text": "Hello, world!", "seed": 16, "max_new_tokens": 16, "streaming": True}
    wav = httpx.post(f"{service.url}/v1/tts", json={**request, "format": "wav"}, headers=AUTH, timeout=120)
    pcm = httpx.post(f"{service.url}/v1/tts", json={**request, "format": "pcm"}, headers=AUTH, timeout=120)
    assert pcm.status_code == wav.status_code == 200
    assert pcm.headers["content-type"] == "application/octet-stream"
    assert pcm.content == wav.content[44:]


# ------------------------------------------------------------------------------------------------- errors


def _tts(**fields) -> dict:
    return {"text": "Hello.", "max_new_tokens": 8, "seed": 1, **fields}


TTS_ERRORS = [
    ({"chunk_length": 99}, 400), ({"chunk_length": 301}, 400), ({"chunk_length": 200.0}, 400),
    ({"top_p": 0.05}, 400), ({"top_p": 1.01}, 400), ({"temperature": 0.09}, 400), ({"temperature": 1.5}, 400),
    ({"repetition_penalty": 0.8}, 400), ({"repetition_penalty": 2.01}, 400), ({"max_new_tokens": -1}, 400),
    ({"format": "ogg"}, 400), ({"use_memory_cache": "maybe"}, 400), ({"normalize": "yes"}, 400),
    ({"streaming": 1}, 400), ({"seed": "7"}, 400), ({"text": ""}, 400), ({"text": "x" * (MAX_TEXT_LENGTH + 1)}, 400),
    ({"speed": 1.0}, 400), ({"streaming": True, "format": "mp3"}, 400), ({"reference_id": "no/such"}, 400),
    ({"references": [{"audio": "not base64!", "text": "t"}]}, 400), ({"references": [{"text": "t"}]}, 400),
    ({"references": [{"audio": "AAAA", "text": "t"}]}, 400),  # valid base64, not audio
    ({"reference_id": "nobody_here"}, 404),
]


@pytest.mark.parametrize("fields,status", TTS_ERRORS, ids=lambda v: str(v)[:40])
def test_tts_errors(service, fields, status):
    answer = httpx.post(f"{service.url}/v1/tts", json=_tts(**fields), headers=AUTH, timeout=60)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"detail"}


def test_tts_text_at_the_limit_and_missing_text(service):
    answer = httpx.post(f"{service.url}/v1/tts", json=_tts(text="a" * MAX_TEXT_LENGTH), headers=AUTH, timeout=120)
    assert answer.status_code == 200
    answer = httpx.post(f"{service.url}/v1/tts", json={"format": "wav"}, headers=AUTH)
    assert answer.status_code == 400 and "text" in answer.json()["detail"]
    too_long = httpx.post(f"{service.url}/v1/tts", json=_tts(text="a" * (MAX_TEXT_LENGTH + 1)), headers=AUTH)
    assert too_long.json()["detail"] == f"Text is too long, max length is {MAX_TEXT_LENGTH}"


def test_unknown_reference_id_is_404_not_a_random_voice(service):
    answer = httpx.post(f"{service.url}/v1/tts", json=_tts(reference_id="nobody_here"), headers=AUTH)
    assert answer.status_code == 404
    assert answer.json() == {"detail": "Reference voice 'nobody_here' not found"}
    assert not (service.data_dir / "speakers" / "nobody_here").exists()  # upstream created the folder


def test_bodies_that_are_not_msgpack_or_json(service):
    url = f"{service.url}/v1/tts"
    assert httpx.post(url, content=b"text=hi", headers={**AUTH, "content-type": "text/plain"}).status_code == 415
    assert httpx.post(url, content=b"\xc1", headers=MSGPACK).status_code == 400
    assert httpx.post(url, content=b"{", headers={**AUTH, "content-type": "application/json"}).status_code == 400
    assert httpx.post(url, json=["text"], headers=AUTH).status_code == 400
    nan = httpx.post(url, content=ormsgpack.packb(_tts(top_p=float("nan"))), headers=MSGPACK)
    assert nan.status_code == 400 and "top_p must be a number" in nan.json()["detail"]


def test_size_limits(service):
    url = f"{service.url}/v1/tts"
    big_audio = base64.b64encode(b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)).decode()
    answer = httpx.post(url, json=_tts(references=[{"audio": big_audio, "text": "t"}]), headers=AUTH, timeout=60)
    assert answer.status_code == 413 and "references[0].audio is too large" in answer.json()["detail"]
    body = b"{" + b" " * (8 * MAX_UPLOAD_MB * 2**20) + b"}"  # past the body limit (a few inline audios)
    answer = httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert answer.status_code == 413


def test_vqgan_errors(service):
    encode, decode = f"{service.url}/v1/vqgan/encode", f"{service.url}/v1/vqgan/decode"
    assert httpx.post(encode, json={"audios": []}, headers=AUTH).status_code == 400
    assert httpx.post(encode, json={"audios": ["AAAA"]}, headers=AUTH).status_code == 400  # not audio
    assert httpx.post(encode, json={"tokens": []}, headers=AUTH).status_code == 400
    grid = [[1, 2]] * 10
    assert httpx.post(decode, json={"tokens": [grid[:9]]}, headers=AUTH).status_code == 400  # 9 codebooks
    assert httpx.post(decode, json={"tokens": [[[1, 2]] * 9 + [[1]]]}, headers=AUTH).status_code == 400  # ragged
    assert httpx.post(decode, json={"tokens": [[[1, -2]] * 10]}, headers=AUTH).status_code == 400
    answer = httpx.post(decode, json={"tokens": [grid]}, headers=AUTH, timeout=60)  # JSON: bytes as base64
    assert answer.status_code == 200
    (audio,) = answer.json()["audios"]
    assert len(np.frombuffer(base64.b64decode(audio), np.float16)) == 2 * 2048


def test_reference_management_errors(service, client_dir):
    add = f"{service.url}/v1/references/add"
    audio = (client_dir / "ref_audio.wav").read_bytes()

    def post_add(data: dict, files: dict | None = None) -> httpx.Response:
        return httpx.post(add, data=data, files=files if files is not None else {"audio": ("a.wav", audio)},
                          headers=AUTH, timeout=60)

    assert post_add({"id": "bad/id", "text": "t"}).status_code == 400
    assert post_add({"id": "x" * 256, "text": "t"}).status_code == 400
    assert post_add({"id": "ok_id", "text": "  "}).status_code == 400
    assert post_add({"id": "ok_id"}).status_code == 400
    assert post_add({"id": "ok_id", "text": "t"}, {"audio": ("a.wav", b"not audio")}).status_code == 400
    ensure_reference(service, "taken", client_dir)
    assert post_add({"id": "taken", "text": "t"}).status_code == 409

    delete = f"{service.url}/v1/references/delete"
    assert httpx.request("DELETE", delete, json={"reference_id": "bad/id"}, headers=AUTH).status_code == 400
    assert httpx.request("DELETE", delete, json={"reference_id": "absent"}, headers=AUTH).status_code == 404
    assert httpx.request("DELETE", delete, json={}, headers=AUTH).status_code == 400

    update = f"{service.url}/v1/references/update"
    ensure_reference(service, "other", client_dir)
    cases = [({"old_reference_id": "taken", "new_reference_id": "bad/id"}, 400),
             ({"old_reference_id": "absent", "new_reference_id": "fresh"}, 404),
             ({"old_reference_id": "taken", "new_reference_id": "other"}, 409),
             ({"old_reference_id": "taken"}, 400)]
    for body, status in cases:
        answer = httpx.post(update, json=body, headers=AUTH)
        assert answer.status_code == status, (body, answer.text)
        assert set(answer.json()) == {"detail"}


def test_async_errors(service):
    create = f"{service.url}/generate_audio_enhanced_async"
    assert httpx.post(create, json={"step_id": "../x", "text": "t"}, headers=AUTH).status_code == 400
    assert httpx.post(create, json={"step_id": "t1", "text": "t", "top_p": 2}, headers=AUTH).status_code == 400
    assert httpx.post(create, json={"step_id": "t1", "text": "t", "streaming": True}, headers=AUTH).status_code == 400
    assert httpx.post(create, json={"text": "t"}, headers=AUTH).status_code == 400
    assert httpx.post(create, json={"step_id": "t1", "text": "t", "reference_id": "nobody_here"},
                      headers=AUTH).status_code == 404
    # Audio is decoded when the task runs: an unreadable reference makes a failed task that says why.
    created = httpx.post(create, json={"step_id": "bad_audio", "text": "t", "references": [{"audio": "AAAA",
                                                                                           "text": "t"}]},
                         headers=AUTH)
    assert created.status_code == 200
    failed = wait_for_status(service.url, "bad_audio", {"completed", "failed"}, AUTH)
    assert failed["status"] == "failed" and "references[0].audio is not a readable audio file" in failed["error"]
    for method, path in [("GET", "/get_task_status/nope"), ("GET", "/download_result/nope"),
                         ("POST", "/stop_async_task/nope")]:
        answer = httpx.request(method, f"{service.url}{path}", headers=AUTH)
        assert answer.status_code == 404 and set(answer.json()) == {"detail"}


# ---------------------------------------------------------------------------------- auth and negotiation


@pytest.mark.parametrize("method,path", [("POST", "/v1/tts"), ("GET", "/v1/references/list"),
                                         ("POST", "/v1/vqgan/encode"), ("GET", "/get_task_status/task_001"),
                                         ("POST", "/stop_generation"), ("POST", "/synthesize"), ("GET", "/stats"),
                                         ("POST", "/v1/audio/speech"), ("GET", "/v1/models")])
def test_every_route_but_health_needs_the_key(service, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEY}"},
                    {"authorization": API_KEY}):
        answer = httpx.request(method, f"{service.url}{path}", headers=headers)
        assert answer.status_code == 401 and "detail" in answer.json()
        assert answer.headers["www-authenticate"] == "Bearer"


def test_openai_sdk_sends_the_key(service):
    def speech(api_key: str) -> bytes:
        client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key, max_retries=0, timeout=120)
        return client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav").content

    audio = speech(API_KEY)
    assert audio[:4] == b"RIFF" and int.from_bytes(audio[24:28], "little") == SAMPLE_RATE  # the Fish backend
    with pytest.raises(openai.AuthenticationError):
        speech("wrong")


def test_health_needs_no_key(service):
    assert httpx.get(f"{service.url}/v1/health").json() == {"status": "ok"}
    assert httpx.post(f"{service.url}/v1/health").json() == {"status": "ok"}
    assert httpx.get(f"{service.url}/health").status_code == 200


def test_answer_format_negotiation(service):
    url = f"{service.url}/v1/references/list"
    assert httpx.get(url, headers=AUTH).headers["content-type"] == "application/json"
    answer = httpx.get(url, params={"format": "msgpack"}, headers=AUTH)
    assert answer.headers["content-type"] == "application/msgpack"
    assert ormsgpack.unpackb(answer.content)["success"] is True
    answer = httpx.get(url, headers={**AUTH, "accept": "application/msgpack"})
    assert answer.headers["content-type"] == "application/msgpack"
    answer = httpx.get(url, headers={**AUTH, "accept": "application/msgpack, application/json"})
    assert answer.headers["content-type"] == "application/json"
    assert httpx.get(url, params={"format": "xml"}, headers=AUTH).status_code == 400


def test_tts_accepts_the_documented_range_edges(service):
    for fields in ({"repetition_penalty": 2.0}, {"repetition_penalty": 0.9}, {"top_p": 1.0}, {"temperature": 1.0}):
        answer = httpx.post(f"{service.url}/v1/tts", json=_tts(**fields), headers=AUTH, timeout=120)
        assert answer.status_code == 200, (fields, answer.text)


def test_cli_client_sends_the_api_key(service, tmp_path):
    from click.testing import CliRunner

    from cosyapp.cli import main

    out = tmp_path / "out.wav"
    refused = CliRunner().invoke(main, ["synth", "Hello.", "-o", str(out), "--url", service.url])
    assert refused.exit_code != 0 and "401" in refused.output
    accepted = CliRunner().invoke(main, ["synth", "Hello.", "-o", str(out), "--url", service.url,
                                         "--api-key", API_KEY])
    assert accepted.exit_code == 0, accepted.output
    assert out.stat().st_size > 44
