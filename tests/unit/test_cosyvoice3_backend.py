"""The CosyVoice3 backend on a random tiny model written by make_tiny: load, verify, stream, and the errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cosyapp.backends.cosyvoice3.backend import CosyVoice3Backend
from cosyapp.engine.registry import backend_names, load_backend, verify_model_dir
from cosyapp.engine.types import InputError, Mode, ModelFileError, SynthesisRequest


@pytest.fixture(scope="module")
def backend(tiny_cosyvoice3_dir: Path) -> CosyVoice3Backend:
    return load_backend("cosyvoice3", tiny_cosyvoice3_dir, device="cpu", dtype="float32", max_streams=2)


@pytest.fixture(scope="module")
def voice(backend: CosyVoice3Backend):
    t = np.arange(24000 * 2) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return backend.prepare_voice(audio, 24000, text="A short test prompt.")


def test_registered() -> None:
    assert "cosyvoice3" in backend_names()


def test_verify(tiny_cosyvoice3_dir: Path) -> None:
    report = verify_model_dir("cosyvoice3", tiny_cosyvoice3_dir)
    assert any(line.startswith("llm.pt: loaded") for line in report)


@pytest.mark.parametrize("mode", list(Mode))
def test_streaming_synthesis(backend: CosyVoice3Backend, voice, mode: Mode) -> None:
    """Enough tokens for several streamed chunks; the chunks are the non-streaming waveform (same seed)."""
    request = dict(text="Hello there, this is a streaming test.", voice=voice, mode=mode, seed=3,
                   instruction="Speak slowly.", fixed_length=120)
    chunks = list(backend.synthesize(SynthesisRequest(stream=True, **request)))
    assert len(chunks) >= 3 and all(c.dtype == np.float32 and np.isfinite(c).all() for c in chunks)
    (whole,) = backend.synthesize(SynthesisRequest(stream=False, **request))
    streamed = np.concatenate(chunks)
    assert streamed.shape == whole.shape == (120 * 2 * 480,)  # 2 mel frames per token, 480 samples per frame
    assert np.abs(streamed - whole).max() < 0.05  # chunk-masked vs full attention in earlier chunks


def test_missing_instruction_is_an_input_error(backend: CosyVoice3Backend, voice) -> None:
    with pytest.raises(InputError, match="instruction"):
        list(backend.synthesize(SynthesisRequest(text="Hi.", voice=voice, mode=Mode.INSTRUCT2)))


@pytest.mark.parametrize("victim", ["cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "speech_tokenizer_v3.onnx"])
def test_bad_model_dir_names_the_file(tiny_cosyvoice3_dir: Path, tmp_path: Path, victim: str) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_cosyvoice3_dir, model_dir)
    (model_dir / victim).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFileError, match=victim.replace(".", r"\.")):
        load_backend("cosyvoice3", model_dir, device="cpu", dtype="float32", max_streams=1)


def test_bounded_streaming_matches_exact_before_the_last_chunk(backend: CosyVoice3Backend, voice,
                                                               tiny_cosyvoice3_dir: Path) -> None:
    """The default bounded chunks equal upstream's re-run chunks, except the last (chunk mask kept there)."""
    exact = load_backend("cosyvoice3", tiny_cosyvoice3_dir, device="cpu", dtype="float32", max_streams=1,
                         exact_streaming=True)
    request = dict(text="Bounded streaming.", voice=voice, mode=Mode.CROSS_LINGUAL, seed=5, fixed_length=200)
    bounded_chunks = list(backend.synthesize(SynthesisRequest(**request)))
    exact_chunks = list(exact.synthesize(SynthesisRequest(**request)))
    assert [len(c) for c in bounded_chunks] == [len(c) for c in exact_chunks]
    assert len(bounded_chunks) >= 4
    for ours, theirs in zip(bounded_chunks[:-1], exact_chunks[:-1]):
        assert np.abs(ours - theirs).max() < 1e-4


def test_bounded_chunks_only_compute_what_they_add(backend: CosyVoice3Backend, voice) -> None:
    """Per chunk, flow runs on the new frames (the voice's complete prompt chunks are computed once, on its first
    request) and HiFT on at most the new frames plus a fixed context."""
    from cosyapp.backends.cosyvoice3.token2wav import HIFT_CONTEXT_FRAMES

    token2wav = backend.token2wav
    assert not token2wav.exact
    request = SynthesisRequest(text="Long enough.", voice=voice, mode=Mode.CROSS_LINGUAL, seed=1, fixed_length=400)
    list(backend.synthesize(SynthesisRequest(text="First.", voice=voice, mode=Mode.CROSS_LINGUAL, fixed_length=30)))
    flow_frames, hift_frames = [], []
    decoder, decode = token2wav.flow.decoder.forward, token2wav.hift.decode

    def record_flow(mu, *args, **kwargs):
        flow_frames.append(mu.size(2))
        return decoder(mu, *args, **kwargs)

    def record_hift(mel, *args, **kwargs):
        hift_frames.append(mel.size(2))
        return decode(mel, *args, **kwargs)

    token2wav.flow.decoder.forward, token2wav.hift.decode = record_flow, record_hift
    try:
        chunks = list(backend.synthesize(request))
    finally:
        del token2wav.flow.decoder.forward, token2wav.hift.decode
    ratio, max_hop = backend.config.token_mel_ratio, token2wav.max_hop
    prompt_tokens = voice.features.speech_token.shape[1]
    prefilled = token2wav.flow.prefill_length(prompt_tokens)
    assert prefilled > 0
    assert len(chunks) == len(flow_frames) == len(hift_frames) >= 5
    assert max(flow_frames) <= ratio * max_hop
    assert max(hift_frames) <= ratio * max_hop + HIFT_CONTEXT_FRAMES + 8
    assert sum(flow_frames) == ratio * (prompt_tokens - prefilled + 400)


def test_declares_instructions_and_no_options(backend: CosyVoice3Backend) -> None:
    info = backend.info()
    assert info.model_type == "CosyVoice3" and info.instruct and "instruct2" in info.modes
    assert info.lm_weights == "float32"  # auto: the tiny LM is too small for int8 to pay
    assert backend.parse_options({}) is None and backend.parse_options(None) is None
    with pytest.raises(InputError, match="temperature"):
        backend.parse_options({"temperature": 0.5})


def test_instruction_forms_become_upstreams(backend: CosyVoice3Backend) -> None:
    """The service's instructions (CosyVoice2's form, ending with the marker) and bare ones get CosyVoice3's
    system prompt; upstream's full form is used as it is."""
    frontend = backend.frontend
    want = frontend.tokenizer.encode("You are a helpful assistant. Speak slowly.<|endofprompt|>")
    assert frontend.instruction_ids("Speak slowly.") == want
    assert frontend.instruction_ids("Speak slowly.<|endofprompt|>") == want
    assert frontend.instruction_ids("You are a helpful assistant. Speak slowly.<|endofprompt|>") == want
