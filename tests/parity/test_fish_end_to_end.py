"""Fish backend end to end against the golden engine/HTTP runs e1..e4 (README 6.6, 7).

Codes and prompts exact; audio 2e-4 abs; HTTP-body PCM within +-1 LSB (WAV header bytes exact) when our float
audio is turned into bytes the way upstream does (non-streaming: libsndfile PCM_16 = floor, clipped;
streaming: truncation toward zero, no header)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.engine.types import Cancelled, InputError, Mode, SynthesisRequest

AUDIO_ATOL = 2e-4
WAV_HEADER = 44


@pytest.fixture(scope="module")
def reference_voice(fish_backend, fish_golden, fish_goldens_json):
    audio, rate = sf.read(fish_golden / "reference.wav", dtype="float32")
    return fish_backend.prepare_voice(audio, rate, fish_goldens_json["reference_text"])


def _request(fish_backend, fish_goldens_json, name: str, voice, stream: bool) -> SynthesisRequest:
    g = fish_goldens_json
    fields = g[name]["request"]
    return SynthesisRequest(
        text=fields["text"], voice=voice if voice is not None else fish_backend.no_reference_voice(),
        mode=Mode.ZERO_SHOT, seed=fields["seed"], stream=stream,
        options={key: fields[key] for key in ("max_new_tokens", "top_p", "repetition_penalty", "temperature",
                                              "chunk_length")})


def _body(fish_npz, name: str) -> bytes:
    return np.asarray(fish_npz("end_to_end")[f"{name}_http_body"], dtype=np.uint8).tobytes()


def _assert_pcm_close(ours: np.ndarray, body: bytes) -> None:
    golden = np.frombuffer(body, dtype="<i2").astype(np.int32)
    assert ours.shape == golden.shape
    assert np.abs(ours.astype(np.int32) - golden).max() <= 1


def _wav_body(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_reference_voice_codes(reference_voice, fish_npz, fish_goldens_json):
    (reference,) = reference_voice.features
    np.testing.assert_array_equal(reference.codes.numpy(), fish_npz("codec")["ref_codes"])
    assert reference.text == fish_goldens_json["reference_text"]


@pytest.mark.parametrize("name", ["e1", "e2"])
def test_prompt_and_generated_codes(fish_backend, reference_voice, fish_npz, fish_goldens_json, name):
    golden = fish_npz("end_to_end")
    voice = reference_voice if fish_goldens_json[name]["n_references"] else None
    request = _request(fish_backend, fish_goldens_json, name, voice, stream=False)
    np.testing.assert_array_equal(fish_backend.prompt_for(request).numpy(), golden[f"{name}_prompt"])
    frames = torch.cat(list(fish_backend.generate_frames(request)), dim=1)
    assert frames.shape[1] == fish_goldens_json[name]["generated_frames_incl_last"][0]
    np.testing.assert_array_equal(frames[1:, :-1].numpy(), golden[f"{name}_codes"])
    np.testing.assert_array_equal(frames[:, -1].numpy(), golden[f"{name}_last_frame"])
    stopped = bool(frames[0, -1] == fish_goldens_json["im_end_id"])
    assert stopped == fish_goldens_json[name]["stopped_on_im_end"][0]


@pytest.mark.parametrize("name,uses_reference,audio_key", [("e1", False, "e1_final_audio"),
                                                           ("e3", True, "e2_segment0")])
def test_non_streaming_audio_and_wav_body(fish_backend, reference_voice, fish_npz, fish_goldens_json, name,
                                          uses_reference, audio_key):
    request = _request(fish_backend, fish_goldens_json, name, reference_voice if uses_reference else None, False)
    chunks = list(fish_backend.synthesize(request))
    assert len(chunks) == 1 and chunks[0].dtype == np.float32
    np.testing.assert_allclose(chunks[0], fish_npz("end_to_end")[audio_key], rtol=0, atol=AUDIO_ATOL)
    body = _body(fish_npz, name)
    assert _wav_body(chunks[0], fish_goldens_json["codec"]["sample_rate"])[:WAV_HEADER] == body[:WAV_HEADER]
    pcm = np.clip(np.floor(chunks[0].astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    _assert_pcm_close(pcm, body[WAV_HEADER:])


@pytest.mark.parametrize("name,uses_reference,audio_key", [("e4", False, "e1_final_audio"),
                                                           ("e2", True, "e2_segment0")])
def test_streaming_audio_and_raw_pcm_body(fish_backend, reference_voice, fish_npz, fish_goldens_json, name,
                                          uses_reference, audio_key):
    request = _request(fish_backend, fish_goldens_json, name, reference_voice if uses_reference else None, True)
    chunks = list(fish_backend.synthesize(request))
    assert len(chunks) > 1  # incremental, unlike upstream's single segment
    audio = np.concatenate(chunks)
    np.testing.assert_allclose(audio, fish_npz("end_to_end")[audio_key], rtol=0, atol=AUDIO_ATOL)
    _assert_pcm_close((audio * 32768).astype(np.int16), _body(fish_npz, name))


def test_instruction_is_rejected(fish_backend):
    request = SynthesisRequest(text="Hello.", voice=fish_backend.no_reference_voice(), mode=Mode.ZERO_SHOT,
                               instruction="Speak happily.")
    with pytest.raises(InputError, match="instruction"):
        next(fish_backend.synthesize(request))


def test_cancel_stops_the_stream(fish_backend):
    request = SynthesisRequest(text="Hello there.", voice=fish_backend.no_reference_voice(), seed=1, stream=True,
                               fixed_length=40)
    stream = fish_backend.synthesize(request)
    first = next(stream)
    assert first.size > 0
    request.cancel.set()
    with pytest.raises(Cancelled):
        list(stream)
