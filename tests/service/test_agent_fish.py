"""The voice agent on the Fish backend (tiny model): the answer at Fish's 44.1 kHz, and `vq_codes` as the
codec's code grid, one row per codebook."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from agent_service import agent_env, decode_wav
from cosyapp.agent.scripted_chat import ScriptedChat
from service_live import running_service


@pytest.fixture(scope="module")
def service(tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("agent_fish")
    with ScriptedChat("Hello there, my friend. See you soon.", words_per_s=50) as chat:
        with running_service(workdir, agent_env(workdir, "fish", tiny_fish_dir, chat.url)) as live:
            yield live


def test_vq_codes_are_the_codec_codes_of_the_answer(service):
    answer = httpx.post(f"{service.url}/run", json={"input": {"message": "Hi", "streaming": False}}, timeout=300)
    assert answer.status_code == 200, answer.text
    output = answer.json()["output"]
    samples, rate = decode_wav(base64.b64decode(output["audio_base64"]))
    assert rate == output["sample_rate"] == 44100
    codes = output["vq_codes"]
    assert len(codes) > 1 and len({len(row) for row in codes}) == 1  # [codebooks][frames]
    frames = len(codes[0])
    assert 0 < frames < samples.shape[0] / 100  # a code frame stands for hundreds of samples
