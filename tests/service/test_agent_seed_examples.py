"""Acceptance: every request example of the voice agent seed (Python, JavaScript, cURL), verbatim apart from
the endpoint URL, against the real service with the embedded chat model (SmolLM2-135M) and the tiny CosyVoice2
model, streaming and not; the audio they get is decoded both ways the examples read it."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from agent_seed_examples import SEED_CURL_BLOCK, SEED_ENDPOINT, SEED_JAVASCRIPT, SEED_PYTHON
from agent_service import AXIOS_STAND_IN, agent_env, data_events, decode_wav, streamed_audio
from service_live import DEFAULT_PROMPT, running_service

SAMPLE_RATE = 24000


@pytest.fixture(scope="module")
def service(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("agent_embedded")
    with running_service(workdir, agent_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir)) as live:
        yield live


@pytest.fixture()
def client(tmp_path: Path) -> Path:
    shutil.copy(DEFAULT_PROMPT, tmp_path / "reference_voice.wav")
    return tmp_path


def test_python_example(service, client: Path):
    code = SEED_PYTHON.replace(SEED_ENDPOINT, f"{service.url}/run")
    driver = code + "\nchat_with_fish_speech('Tell me a joke', system_message='You are funny', streaming=True)\n"
    result = subprocess.run([sys.executable, "-c", driver], cwd=client, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # The example's non-streaming branch reads audio_base64 as raw int16 and writes it with soundfile: it is a
    # WAV file, so its 44-byte header becomes 22 samples in front of the speech, and the rest is the speech.
    written, rate = soundfile.read(client / "response.wav", dtype="int16")
    assert rate == SAMPLE_RATE and written.size > 22 + SAMPLE_RATE // 10
    assert result.stdout.strip(), "the example printed no answer text"


def test_javascript_example(service, client: Path):
    if shutil.which("node") is None:
        pytest.skip("node is not installed (scripts/setup.sh installs nodejs)")
    (client / "node_modules" / "axios").mkdir(parents=True)
    (client / "node_modules" / "axios" / "index.js").write_text(AXIOS_STAND_IN)
    # The example as it is: its main() asks for a whole answer and saves the audio (its streaming branch parses
    # every piece of the body Node hands it as one event, which holds only while the network keeps up).
    (client / "example.js").write_text(SEED_JAVASCRIPT.replace(SEED_ENDPOINT, f"{service.url}/run"))
    result = subprocess.run(["node", "example.js"], cwd=client, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    assert "Audio saved to response.wav" in result.stdout
    samples, rate = soundfile.read(client / "response.wav", dtype="int16")  # the bytes as saved: a WAV file
    assert rate == SAMPLE_RATE and samples.size > SAMPLE_RATE // 10


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (scripts/setup.sh installs it)")
def test_curl_examples(service, client: Path):
    commands = [block for block in SEED_CURL_BLOCK.replace(SEED_ENDPOINT, f"{service.url}/run").split("\n\n")]
    assert len(commands) == 2
    whole = subprocess.run(["bash", "-c", commands[0]], capture_output=True, timeout=600, check=True).stdout
    answer = json.loads(whole)
    assert answer["status"] == "success" and answer["id"]
    output = answer["output"]
    assert output["text"] and output["audio_format"] == "wav" and output["sample_rate"] == SAMPLE_RATE
    assert [message["role"] for message in output["history"]] == ["system", "user", "assistant"]
    assert output["history"][0]["content"] == "You are a funny assistant"
    assert output["history"][2]["content"].startswith(output["text"])
    samples, rate = decode_wav(base64.b64decode(output["audio_base64"]))
    assert rate == SAMPLE_RATE and samples.size > 0
    assert len(output["vq_codes"]) == 1 and len(output["vq_codes"][0]) > 0  # CosyVoice2: one row of speech tokens

    streamed = subprocess.run(["bash", "-c", commands[1]], capture_output=True, text=True, timeout=600, check=True)
    events = data_events(streamed.stdout.splitlines())
    assert {event["type"] for event in events} == {"text", "audio"}
    assert "".join(event["content"] for event in events if event["type"] == "text").strip()
    audio = streamed_audio(events, SAMPLE_RATE)
    assert np.abs(audio).max() > 0
