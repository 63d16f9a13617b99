"""The voice agent (/run and RunPod's job routes) on the real service with the tiny CosyVoice2 model and a
scripted OpenAI-compatible chat model (real HTTP, real streaming) that keeps what it was sent: conversation
memory across turns and restarts, speaking while the answer is written, RunPod's client library, bad input,
a chat model that is down or slow, and a client that leaves."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import runpod
import soundfile

from agent_service import agent_env, data_events, decode_wav, streamed_audio
from cosyapp.agent.scripted_chat import ScriptedChat
from service_live import DEFAULT_PROMPT, free_port, running_service, wait_idle

SAMPLE_RATE = 24000
ANSWER = ("Sure, here is a plan for the day. First we walk along the river to the old bridge. "
          "Then we stop for lunch at the market. In the evening we watch the sun go down from the hill.")


@pytest.fixture(scope="module")
def chat():
    with ScriptedChat(ANSWER, words_per_s=40) as scripted:
        yield scripted


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent")


@pytest.fixture(scope="module")
def env(workdir: Path, tiny_cosyvoice2_dir: Path, chat) -> dict[str, str]:
    return agent_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir, chat.url, COSYAPP_AGENT_CHAT_TIMEOUT_S="2",
                     COSYAPP_AGENT_MIN_SENTENCE_CHARS="10")


@pytest.fixture(scope="module")
def service(workdir: Path, env: dict[str, str]):
    with running_service(workdir, env) as live:
        yield live


def prompt_base64() -> str:
    return base64.b64encode(DEFAULT_PROMPT.read_bytes()).decode()


def run(service, timeout: float = 120, **fields) -> httpx.Response:
    return httpx.post(f"{service.url}/run", json={"input": fields}, timeout=timeout)


def assert_seed_error(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["id"], body
    assert words in body["output"]["error"], body
    assert body["output"]["trace"] == f"reference {body['id']}"
    assert "Traceback" not in response.text
    return body


def test_second_turn_sees_the_first_and_keeps_the_voice_across_a_restart(service, chat, workdir, env):
    first = run(service, message="Plan my day", system_message="You are a travel guide", conversation_id="trip-1",
                system_audio=prompt_base64(), streaming=False)
    assert first.status_code == 200, first.text
    assert chat.requests[-1]["messages"] == [{"role": "system", "content": "You are a travel guide"},
                                             {"role": "user", "content": "Plan my day"}]
    assert chat.requests[-1]["model"] == "scripted" and chat.requests[-1]["stream"] is True
    voice_document = service.data_dir / "documents" / "conversation_voices" / "trip-1.json"
    stored_voice = base64.b64decode(json.loads(voice_document.read_text()))
    voice, rate = soundfile.read(io.BytesIO(stored_voice), dtype="float32")
    reference, reference_rate = soundfile.read(DEFAULT_PROMPT, dtype="float32")
    assert rate == reference_rate and np.allclose(voice, reference[:voice.shape[0]], atol=1 / 32768)

    second = run(service, message="And tomorrow?", conversation_id="trip-1", streaming=False)
    assert second.status_code == 200, second.text
    exchange = [{"role": "system", "content": "You are a travel guide"}, {"role": "user", "content": "Plan my day"},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And tomorrow?"}]
    assert chat.requests[-1]["messages"] == exchange
    history = second.json()["output"]["history"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[2]["content"].startswith(ANSWER + " <audio ") and history[2]["content"].endswith("s>")
    # the second turn speaks in the voice the first one gave
    assert base64.b64decode(json.loads(voice_document.read_text())) == stored_voice

    # A new service process on the same data folder remembers the conversation and its voice.
    restarted_env = {**env, "COSYAPP_SERVER_PORT": str(free_port())}
    with running_service(workdir / "restarted", restarted_env) as again:
        third = run(again, message="Thanks", conversation_id="trip-1", streaming=False)
        assert third.status_code == 200, third.text
    assert chat.requests[-1]["messages"] == [*exchange, {"role": "assistant", "content": ANSWER},
                                             {"role": "user", "content": "Thanks"}]
    assert len(third.json()["output"]["history"]) == 7


def test_first_audio_leaves_before_the_answer_is_written(service, chat):
    chat.words_per_s = 8  # ~4.5 s for the whole answer
    try:
        started = time.perf_counter()
        arrivals, lines = [], []
        with httpx.stream("POST", f"{service.url}/run", json={"input": {"message": "Plan my day"}},
                          timeout=120) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            job_id = response.headers["x-job-id"]
            for line in response.iter_lines():
                lines.append(line)
                arrivals.append(time.perf_counter() - started)
    finally:
        chat.words_per_s = 40
    events = data_events(lines)
    arrivals = [arrival for arrival, line in zip(arrivals, lines) if line]
    text_times = [t for t, event in zip(arrivals, events) if event["type"] == "text"]
    audio_times = [t for t, event in zip(arrivals, events) if event["type"] == "audio"]
    assert "".join(event["content"] for event in events if event["type"] == "text") == ANSWER
    assert audio_times[0] < text_times[-1] - 1.0, (audio_times[0], text_times[-1])
    sentences = [event["sentence"] for event in events if event["type"] == "audio"]
    assert sentences == sorted(sentences) and sentences[-1] == 3  # four sentences, their audio in order
    assert streamed_audio(events, SAMPLE_RATE).size > 0
    assert httpx.get(f"{service.url}/status/{job_id}").json()["status"] == "COMPLETED"


@pytest.mark.parametrize("audio_format", ["mp3", "flac"])
def test_whole_answer_formats(service, audio_format):
    answer = run(service, message="Hi", streaming=False, format=audio_format).json()
    data = base64.b64decode(answer["output"]["audio_base64"])
    samples, rate = soundfile.read(io.BytesIO(data))
    assert answer["output"]["audio_format"] == audio_format and rate == SAMPLE_RATE and samples.size > 0


def test_runpod_client_library(service, monkeypatch):
    monkeypatch.setattr(runpod, "api_key", "unused")
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{service.url}/v2")
    endpoint = runpod.Endpoint("cosyapp")

    job = endpoint.run({"message": "Plan my day", "streaming": False})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    output = job.output(timeout=120)
    assert job.status() == "COMPLETED" and output["text"] == ANSWER
    assert decode_wav(base64.b64decode(output["audio_base64"]))[1] == SAMPLE_RATE

    output = endpoint.run_sync({"input": {"message": "Plan my day", "streaming": False}}, timeout=120)
    assert output["text"] == ANSWER and output["sample_rate"] == SAMPLE_RATE

    streamed = list(endpoint.run({"message": "Plan my day"}).stream())
    assert "".join(chunk["content"] for chunk in streamed if chunk["type"] == "text") == ANSWER
    assert streamed_audio(streamed, SAMPLE_RATE).size > 0


def test_runpod_cancel_and_status_shapes(service, chat):
    chat.words_per_s = 2
    try:
        queued = httpx.post(f"{service.url}/v2/any/run", json={"input": {"message": "Plan my day"}}).json()
        assert queued["status"] in ("IN_QUEUE", "IN_PROGRESS") and queued["id"]
        cancelled = httpx.post(f"{service.url}/cancel/{queued['id']}").json()
        assert cancelled == {"id": queued["id"], "status": "CANCELLED"}
        assert httpx.get(f"{service.url}/v2/any/status/{queued['id']}").json()["status"] == "CANCELLED"
    finally:
        chat.words_per_s = 40
    missing = httpx.get(f"{service.url}/status/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    health = httpx.get(f"{service.url}/v2/any/health").json()
    assert health["jobs"]["cancelled"] >= 1 and "idle" in health["workers"]
    wait_idle(service)


def long_recording(seconds: float) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * 8000), dtype=np.float32), 8000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("fields, words", [
    ({"streaming": False}, "message is missing"),
    ({"message": "  "}, "message is missing"),
    ({"message": "Hi", "system_audio": "not base64!"}, "not valid base64"),
    ({"message": "Hi", "system_audio": base64.b64encode(b"not audio at all").decode()}, "not a readable audio"),
    ({"message": "Hi", "system_audio": long_recording(91)}, "too long"),
    ({"message": "Hi", "format": "ogg", "streaming": False}, "format must be one of wav, mp3, flac"),
    ({"message": "Hi", "format": "mp3"}, "streaming supports only wav"),
    ({"message": "x" * 1001}, "message is too long: 1001 characters, the limit (max_text_length) is 1000"),
    ({"message": "x" * 50, "max_text_length": 20}, "the limit (max_text_length) is 20"),
    ({"message": "Hi", "temperature": 5}, "temperature must be from 0 to 2"),
    ({"message": "Hi", "conversation_id": "../etc"}, "conversation_id must be"),
    ({"message": "Hi", "voice": "x"}, "unknown field(s) voice"),
])
def test_bad_input_answers_400_in_the_seed_error_shape(service, fields, words):
    assert_seed_error(run(service, **fields), 400, words)


def test_body_that_is_not_a_request(service):
    assert_seed_error(httpx.post(f"{service.url}/run", json={"message": "Hi"}), 400, "unknown field(s) message")
    assert_seed_error(httpx.post(f"{service.url}/run", json={}), 400, "missing required field 'input'")


def test_slow_chat_model_fails_within_the_timeout(service, chat):
    chat.delay_s = 30
    try:
        started = time.perf_counter()
        response = run(service, message="Hi", streaming=False)
        assert time.perf_counter() - started < 10
    finally:
        chat.delay_s = 0
    assert_seed_error(response, 504, "sent nothing for 2 s")


def test_chat_model_that_is_down(workdir: Path, tiny_cosyvoice2_dir: Path):
    env = agent_env(workdir / "down", "cosyvoice2", tiny_cosyvoice2_dir, f"http://127.0.0.1:{free_port()}/v1")
    with running_service(workdir / "down", env) as down:
        started = time.perf_counter()
        assert_seed_error(run(down, message="Hi"), 502, "cannot be reached")
        assert time.perf_counter() - started < 10


def test_client_that_leaves_cancels_the_chat_and_the_synthesis(service, chat):
    chat.words_per_s = 4
    try:
        with httpx.stream("POST", f"{service.url}/run", json={"input": {"message": "Plan my day"}},
                          timeout=60) as response:
            job_id = response.headers["x-job-id"]
            for line in response.iter_lines():
                if line and json.loads(line[len("data: "):])["type"] == "audio":
                    break  # leave mid-answer, while both the chat model and the synthesis are busy
        deadline = time.monotonic() + 10
        while (state := httpx.get(f"{service.url}/status/{job_id}").json())["status"] != "CANCELLED":
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        wait_idle(service, timeout=10)
    finally:
        chat.words_per_s = 40
