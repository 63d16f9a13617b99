"""`sample_rate` on every API that streams (/synthesize, OpenAI's /v1/audio/speech, Fish's /v1/tts and live
socket): the audio comes at the rate asked for, announced in the headers or the WAV header, and it is the native
output resampled: the same request at the model's rate (same seed, so the same audio), resampled offline with
torchaudio, has the same spectrum (within 0.5 dB in every band that holds audio; the waveforms within 4 LSB),
and no chunk join steps further than the signal itself does around it (nor any sample further than the offline
signal does there).

One service runs CosyVoice2 (/synthesize, OpenAI) and Fish (/v1/tts, the live socket) on their tiny models."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import httpx
import httpx_ws
import numpy as np
import ormsgpack
import pytest
import torch
import torchaudio.functional as AF

from service_live import running_service, service_env

RATES = (8000, 16000, 22050)
SEED = 11
LSB = 1 / 32768
# A streamed piece: (announced rate, s16le samples, where the pieces of the stream joined, in samples).
Received = tuple[int, np.ndarray, list[int]]


@pytest.fixture(scope="module")
def service(tiny_cosyvoice2_dir: Path, tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("sample_rate")
    env = {**service_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir), "COSYAPP_MODEL_EXTRA_BACKEND": "fish",
           "COSYAPP_MODEL_EXTRA_MODEL_DIR": str(tiny_fish_dir), "COSYAPP_MODEL_WARMUP": "false"}
    with running_service(workdir, env) as live:
        yield live


def wav_rate(header: bytes) -> int:
    assert header[:4] == b"RIFF" and header[8:12] == b"WAVE", header[:16]
    return struct.unpack("<I", header[24:28])[0]


def samples_and_joins(pieces: list[bytes], skip: int = 0) -> tuple[np.ndarray, list[int]]:
    """The s16le samples of the pieces joined, less `skip` header bytes, and where the pieces met (in samples)."""
    body = b"".join(pieces)[skip:]
    assert body and len(body) % 2 == 0
    ends = np.cumsum([len(piece) for piece in pieces])[:-1] - skip
    return np.frombuffer(body, dtype="<i2"), [int(end) // 2 for end in ends if end > 0]


def streamed_http(response: httpx.Response, wav: bool) -> Received:
    assert response.status_code == 200, response.read()
    pieces = [piece for piece in response.iter_raw() if piece]
    rate = int(response.headers["x-sample-rate"])
    if wav:
        assert wav_rate(b"".join(pieces)[:44]) == rate
    return (rate, *samples_and_joins(pieces, 44 if wav else 0))


def synthesize(service, sample_rate: int | None) -> Received:
    fields = {"text": "你好,欢迎光临。今天天气真好。", "seed": str(SEED), "fixed_length": "150", "format": "wav"}
    if sample_rate is not None:
        fields["sample_rate"] = str(sample_rate)
    with httpx.stream("POST", f"{service.url}/synthesize", data=fields, timeout=120) as response:
        return streamed_http(response, wav=True)


def openai_speech(service, sample_rate: int | None) -> Received:
    body = {"model": "tts-1", "input": "Hello there, how are you today? The weather is fine and the shop is open.",
            "response_format": "pcm", "seed": SEED}
    if sample_rate is not None:
        body["sample_rate"] = sample_rate
    with httpx.stream("POST", f"{service.url}/v1/audio/speech", json=body, timeout=120) as response:
        return streamed_http(response, wav=False)


def fish_tts(service, sample_rate: int | None) -> Received:
    body = {"text": "Hello there. This is a test.", "format": "wav", "streaming": True, "seed": SEED,
            "max_new_tokens": 100}
    if sample_rate is not None:
        body["sample_rate"] = sample_rate
    with httpx.stream("POST", f"{service.url}/v1/tts", json=body, timeout=120) as response:
        return streamed_http(response, wav=True)


def fish_live(service, sample_rate: int | None) -> Received:
    request = {"text": "", "format": "wav", "seed": SEED, "max_new_tokens": 100, "min_chunk_length": 0}
    if sample_rate is not None:
        request["sample_rate"] = sample_rate
    with httpx.Client(base_url=service.url, timeout=120) as client, \
            httpx_ws.connect_ws("/v1/tts/live", client=client) as ws:
        for event in ({"event": "start", "request": request}, {"event": "text", "text": "Hello there."},
                      {"event": "stop"}):
            ws.send_bytes(ormsgpack.packb(event))
        events = []
        while not events or events[-1]["event"] != "finish":
            events.append(ormsgpack.unpackb(ws.receive_bytes(timeout=120)))
    assert events[-1]["reason"] == "stop", events[-1]
    pieces = [event["audio"] for event in events[:-1]]
    return (wav_rate(pieces[0][:44]), *samples_and_joins(pieces, 44))


APIS: dict[str, Callable[..., Received]] = {
    "synthesize": synthesize, "openai": openai_speech, "fish_tts": fish_tts, "fish_live": fish_live}
NATIVE_RATES = {"synthesize": 24000, "openai": 24000, "fish_tts": 44100, "fish_live": 44100}


@pytest.fixture(scope="module")
def native(service) -> dict[str, Received]:
    """Each API's answer at the model's own rate (memoised: one request per API)."""
    return {}


def band_power_db(signal: np.ndarray, bands: int = 32, frame: int = 512) -> np.ndarray:
    """Welch-style mean power spectrum (Hann frames, half overlap) summed into `bands` equal bands, in dB."""
    window = np.hanning(frame)
    frames = np.lib.stride_tricks.sliding_window_view(signal, frame)[::frame // 2]
    power = (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).mean(axis=0)[1:]
    return 10 * np.log10(power.reshape(bands, -1).sum(axis=1) + 1e-20)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("api", APIS)
def test_audio_comes_at_the_asked_rate_as_the_native_audio_resampled(service, native, api: str, rate: int) -> None:
    if api not in native:
        native[api] = APIS[api](service, None)
    native_rate, native_samples, _ = native[api]
    assert native_rate == NATIVE_RATES[api]
    announced, samples, joins = APIS[api](service, rate)
    assert announced == rate
    assert joins, "the audio should have come in several pieces"

    reference = AF.resample(torch.from_numpy(native_samples / 32768.0), native_rate, rate).numpy()
    signal = samples / 32768.0
    assert signal.shape == reference.shape  # ceil(rate * native samples / native rate)
    assert np.abs(signal - reference).max() <= 4 * LSB

    audible = band_power_db(reference) > band_power_db(reference).max() - 60
    difference = np.abs(band_power_db(signal) - band_power_db(reference))[audible]
    assert audible.sum() >= 16 and difference.max() < 0.5, difference

    # No step anywhere (chunk joins included, those the network merged too) beyond the offline signal's own step
    # there, give or take the rounding of the two; and at the joins seen, none beyond the steps around them.
    steps = np.abs(np.diff(signal))
    assert (steps <= np.abs(np.diff(reference)) + 8 * LSB).all()
    around = max(rate // 100, 8)  # 10 ms on each side
    for join in joins:
        if not around < join < signal.shape[0] - around:
            continue
        neighbourhood = np.concatenate([steps[join - around:join - 1], steps[join:join + around]])
        assert steps[join - 1] <= neighbourhood.max() + 2 * LSB, f"a step at the join at sample {join}"


@pytest.mark.parametrize("api, request_body", [
    ("/synthesize", {"data": {"text": "你好", "sample_rate": "12345"}}),
    ("/synthesize", {"data": {"text": "你好", "sample_rate": "fast"}}),
    ("/v1/audio/speech", {"json": {"input": "hello", "sample_rate": 96000}}),
    ("/v1/tts", {"json": {"text": "hello", "sample_rate": 7999}}),
])
def test_a_sample_rate_that_is_not_offered_is_a_400_naming_it(service, api: str, request_body: dict) -> None:
    response = httpx.post(f"{service.url}{api}", timeout=60, **request_body)
    assert response.status_code == 400
    assert "sample_rate" in response.text
