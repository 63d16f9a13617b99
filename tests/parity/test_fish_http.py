"""The Fish API on the golden tiny model, in-process, against upstream's HTTP runs e1..e6 (README 6.6).

/v1/tts answers e1..e4 with upstream's headers and audio within 1 LSB, and fixes what upstream got wrong (e5: pcm
-> 500; streaming sent no WAV header), unless `[fishapi] wav_stream_header = false` asks for upstream's
headerless stream; /v1/vqgan/encode gives the reference recording's golden codes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ormsgpack
import pytest
from starlette.testclient import TestClient

from cosyapp.config import load_settings

MSGPACK = {"content-type": "application/msgpack"}
WAV_HEADER = 44


def _client(fish_golden: Path, data_dir: Path, **settings: str) -> TestClient:
    """The app serving the golden tiny model; `settings` are further COSYAPP_* variables."""
    from cosyapp.server import create_app

    return TestClient(create_app(load_settings(None, env={
        "COSYAPP_MODEL_BACKEND": "fish", "COSYAPP_MODEL_MODEL_DIR": str(fish_golden / "tiny"),
        "COSYAPP_MODEL_DEVICE": "cpu", "COSYAPP_MODEL_WARMUP": "false", "COSYAPP_STORAGE_DATA_DIR": str(data_dir),
        **settings})))


def _wait_ready(client: TestClient) -> None:
    for _ in range(600):
        if client.get("/v1/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the model did not load")


@pytest.fixture(scope="module")
def client(fish_golden: Path, tmp_path_factory: pytest.TempPathFactory):
    with _client(fish_golden, tmp_path_factory.mktemp("fish_http")) as client:
        _wait_ready(client)
        yield client


def _request(fish_golden: Path, goldens: dict, name: str) -> dict:
    """Run `name`'s request, with the golden reference recording when it used one."""
    request = dict(goldens[name]["request"])
    if goldens[name].get("n_references"):
        audio = (fish_golden / "reference.wav").read_bytes()
        request["references"] = [{"audio": audio, "text": goldens["reference_text"]}]
    return request


def _body(fish_npz, name: str) -> bytes:
    return np.asarray(fish_npz("end_to_end")[f"{name}_http_body"], dtype=np.uint8).tobytes()


def _assert_pcm_close(ours: bytes, golden: bytes) -> None:
    a, b = np.frombuffer(ours, "<i2").astype(np.int32), np.frombuffer(golden, "<i2").astype(np.int32)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("name", ["e1", "e2", "e3", "e4"])
def test_tts_bodies_match_upstream(client, fish_golden, fish_goldens_json, fish_npz, name):
    """Upstream's api_client request (msgpack) -> the same headers and audio as upstream's server."""
    golden = fish_goldens_json[name]
    answer = client.post("/v1/tts", content=ormsgpack.packb(_request(fish_golden, fish_goldens_json, name)),
                         headers=MSGPACK)
    assert answer.status_code == golden["http_status"] == 200
    for header, value in golden["http_headers"]:
        assert answer.headers[header] == value
    body = _body(fish_npz, name)
    if golden["request"]["streaming"]:
        # Upstream dropped the WAV header of its streams; ours has one, then the same PCM.
        assert answer.content[:4] == b"RIFF"
        _assert_pcm_close(answer.content[WAV_HEADER:], body)
    else:
        assert answer.content[:WAV_HEADER] == body[:WAV_HEADER]
        _assert_pcm_close(answer.content[WAV_HEADER:], body[WAV_HEADER:])


def test_tts_fixes_upstreams_failures(client, fish_goldens_json, fish_npz):
    pcm = dict(fish_goldens_json["e5_nonstreaming_pcm"]["request"])  # upstream: 500 after the whole generation
    answer = client.post("/v1/tts", content=ormsgpack.packb(pcm), headers=MSGPACK)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    _assert_pcm_close(answer.content, _body(fish_npz, "e1")[WAV_HEADER:])
    mp3_stream = dict(fish_goldens_json["e6_streaming_mp3"]["request"])  # upstream: 400 as well, in its own format
    answer = client.post("/v1/tts", content=ormsgpack.packb(mp3_stream), headers=MSGPACK)
    assert answer.status_code == fish_goldens_json["e6_streaming_mp3"]["http_status"] == 400
    assert "Streaming only supports" in answer.json()["detail"]


def test_vqgan_encode_gives_the_reference_codes(client, fish_golden, fish_npz):
    audio = (fish_golden / "reference.wav").read_bytes()
    answer = client.post("/v1/vqgan/encode", params={"format": "msgpack"},
                         content=ormsgpack.packb({"audios": [audio]}), headers=MSGPACK)
    assert answer.status_code == 200, answer.text
    (codes,) = ormsgpack.unpackb(answer.content)["tokens"]
    np.testing.assert_array_equal(np.array(codes), fish_npz("codec")["ref_codes"])


def test_headerless_stream_is_upstreams_body(fish_golden, fish_goldens_json, fish_npz, tmp_path: Path):
    with _client(fish_golden, tmp_path, COSYAPP_FISHAPI_WAV_STREAM_HEADER="false") as client:
        _wait_ready(client)
        answer = client.post("/v1/tts", content=ormsgpack.packb(fish_goldens_json["e4"]["request"]),
                             headers=MSGPACK)
    assert answer.status_code == 200 and answer.headers["content-type"] == "audio/wav"
    _assert_pcm_close(answer.content, _body(fish_npz, "e4"))
