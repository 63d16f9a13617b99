"""Parity of the CosyVoice3 backend's product API with upstream's: golden e2e.npz (ladder 7).

Text -> tokens -> audio through `load()` and `synthesize()` for every mode, streaming and not, seeded like the
golden runs: the speech tokens handed to flow (after the silence cap), the chunk lengths, and the audio. The
backend runs upstream's exact streaming path (`exact_streaming=True`); the bounded one is checked by
test_cosyvoice3_stream.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.backends.cosyvoice2.decoding import generate
from cosyapp.backends.cosyvoice2.llm import length_limits
from cosyapp.backends.cosyvoice3.backend import CosyVoice3Backend, load
from cosyapp.backends.cosyvoice3.decoding import SilenceCap
from cosyapp.engine.types import Mode, SynthesisRequest, Voice

MODES = ("zero_shot", "cross_lingual", "instruct2")
WAV_ATOL = 1e-4  # README: waveforms within ~1e-4 abs


@pytest.fixture(scope="module")
def backend(cosyvoice3_golden: Path) -> CosyVoice3Backend:
    return load(cosyvoice3_golden / "tiny", device="cpu", dtype="float32", max_streams=1, exact_streaming=True)


@pytest.fixture(scope="module")
def voice(backend: CosyVoice3Backend, cosyvoice3_golden: Path) -> Voice:
    wav, sample_rate = sf.read(cosyvoice3_golden / "prompt.wav", dtype="float32")
    return backend.prepare_voice(wav, sample_rate)


def request(cv3_settings: dict, voice: Voice, mode: str, stream: bool) -> SynthesisRequest:
    texts = cv3_settings["texts_raw"]
    return SynthesisRequest(text=texts[cv3_settings["modes"][mode]["tts_text_key"]], voice=voice, mode=Mode(mode),
                            stream=stream, prompt_text=texts["prompt_text"], instruction=texts["instruct"],
                            seed=cv3_settings["sampling"]["seed"])


@pytest.mark.parametrize("mode", MODES)
def test_tokens_after_silence_cap(backend, voice, cv3_npz, cv3_settings, mode):
    req = request(cv3_settings, voice, mode, stream=False)
    (text_ids,) = backend.frontend.text_sentences(req.text)
    model_input = backend.frontend.build_model_input(req.mode, text_ids, voice.features, backend._prompt_ids(req))
    lm_input = backend.llm.build_lm_input(model_input.text, model_input.prompt_text,
                                          model_input.llm_prompt_speech_token)
    generator = torch.Generator().manual_seed(req.seed)
    made = generate(backend.llm, lm_input, *length_limits(model_input.text_len), generator)
    tokens = list(SilenceCap().filter(made))
    for stream in ("nonstream", "stream"):
        expected = cv3_npz("e2e")[f"{mode}__{stream}__tokens"]
        assert len(expected) == cv3_settings["e2e"][f"{mode}__{stream}"]["n_tokens"]
        assert tokens == expected.tolist()


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
@pytest.mark.parametrize("mode", MODES)
def test_product_api_audio(backend, voice, cv3_npz, cv3_settings, mode, stream):
    key = f"{mode}__{'stream' if stream else 'nonstream'}"
    chunks = list(backend.synthesize(request(cv3_settings, voice, mode, stream)))
    golden = cv3_npz("e2e")
    assert [len(c) for c in chunks] == golden[f"{key}__chunk_lengths"].tolist() == \
        cv3_settings["e2e"][key]["chunk_lengths"]
    wav = np.concatenate(chunks)
    assert wav.shape == golden[f"{key}__wav"].shape
    err = float(np.abs(wav.astype(np.float64) - golden[f"{key}__wav"]).max())
    assert err <= WAV_ATOL, f"{key}: max abs diff {err:.3g}"
