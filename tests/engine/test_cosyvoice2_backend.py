"""End-to-end CosyVoice2 on the tiny model (CPU): the three modes, streaming and not, and bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend, verify
from cosyapp.engine.stats import StageTimes
from cosyapp.engine.types import Cancelled, InputError, Mode, ModelFileError, SynthesisRequest

# Long enough that the LM (which runs at least 2x the text tokens) streams two hops before the final chunk.
TWO_SENTENCES = "Hello there, how are you? The weather is lovely today, so let us all take a long walk by the river."
# A paragraph the frontend splits in two segments.
LONG_TEXT = ("Streaming speech synthesis needs careful chunking of the token sequence. Each chunk of speech tokens is "
             "converted into a mel spectrogram by the flow model. The vocoder then turns the mel spectrogram into a "
             "waveform at 24 kilohertz. Finally, overlapping parts are faded together so that no clicks are audible.")
# The project's default prompt voice and its transcript (README: "The default prompt voice").
PROMPT_WAV = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"
PROMPT_TEXT = "欢迎光临，请问您需要点什么？"
SAMPLES_PER_TOKEN = 960  # 2 mel frames x 480 samples at 24 kHz
WITHHELD = 3840  # the cross-fade tail every non-final chunk holds back


@pytest.fixture(scope="module")
def backend(tiny_cosyvoice2_dir: Path) -> CosyVoice2Backend:
    torch.set_num_threads(2)
    return CosyVoice2Backend(tiny_cosyvoice2_dir, device="cpu", max_streams=2)


@pytest.fixture(scope="module")
def voice(backend: CosyVoice2Backend):
    wav, sr = sf.read(PROMPT_WAV, dtype="float32")
    return backend.prepare_voice(wav, sr, PROMPT_TEXT)


MODES = [
    (Mode.ZERO_SHOT, {}),
    (Mode.CROSS_LINGUAL, {}),
    (Mode.INSTRUCT2, {"instruction": "Speak cheerfully, like a radio host.<|endofprompt|>"}),
]


@pytest.mark.parametrize("mode,extra", MODES, ids=[m.value for m, _ in MODES])
def test_streaming_follows_the_schedule(backend, voice, mode, extra) -> None:
    stats = StageTimes()
    request = SynthesisRequest(text=TWO_SENTENCES, voice=voice, mode=mode, seed=7, stats=stats, **extra)
    chunks = list(backend.synthesize(request))
    # Short sentences are merged into one segment (upstream's split_paragraph): its first hop, a streamed
    # chunk at least, and the final chunk.
    assert len(chunks) >= 3
    assert all(c.dtype == np.float32 and c.ndim == 1 and np.isfinite(c).all() for c in chunks)
    prompt_tokens = voice.features.speech_token.shape[1]
    first_hop = 25 + (-prompt_tokens % 25)
    assert len(chunks[0]) == first_hop * SAMPLES_PER_TOKEN - WITHHELD
    # The LM ran at least min_len = 2x the text tokens, and every token was vocoded.
    text_tokens = sum(len(ids) for ids in backend.frontend.text_sentences(TWO_SENTENCES))
    n_tokens = stats.summary()["lm_token"]["count"]
    assert n_tokens >= 2 * text_tokens
    assert sum(len(c) for c in chunks) == n_tokens * SAMPLES_PER_TOKEN
    assert max(np.abs(c).max() for c in chunks) <= 0.99 + 1e-6


def test_non_streaming_yields_one_waveform(backend, voice) -> None:
    request = SynthesisRequest(text=TWO_SENTENCES, voice=voice, mode=Mode.CROSS_LINGUAL, stream=False, seed=3)
    pieces = list(backend.synthesize(request))
    assert len(pieces) == 1
    assert pieces[0].shape[0] % SAMPLES_PER_TOKEN == 0 and pieces[0].shape[0] > 0


def test_same_seed_same_audio(backend, voice) -> None:
    def run() -> np.ndarray:
        request = SynthesisRequest(text="Good morning.", voice=voice, mode=Mode.ZERO_SHOT, seed=11)
        return np.concatenate(list(backend.synthesize(request)))

    np.testing.assert_array_equal(run(), run())


def test_fixed_length_generates_exactly_n_tokens(backend, voice) -> None:
    request = SynthesisRequest(text="Hi.", voice=voice, mode=Mode.CROSS_LINGUAL, stream=False, fixed_length=60)
    (wav,) = backend.synthesize(request)
    assert wav.shape[0] == 60 * SAMPLES_PER_TOKEN


def test_cancel_stops_generation(backend, voice) -> None:
    # A fixed length: a random model may stop early, and its first chunk would then be its last.
    request = SynthesisRequest(text=TWO_SENTENCES, voice=voice, mode=Mode.CROSS_LINGUAL, fixed_length=90)
    stream = backend.synthesize(request)
    next(stream)
    request.cancel.set()
    with pytest.raises(Cancelled):
        next(stream)
    stream.close()
    # The LM cache row came back: both rows can be used again at once.
    a = backend.synthesize(SynthesisRequest(text="One.", voice=voice, fixed_length=30, stream=False))
    b = backend.synthesize(SynthesisRequest(text="Two.", voice=voice, fixed_length=30, stream=False))
    assert len(next(a)) == len(next(b)) == 30 * SAMPLES_PER_TOKEN


def test_voice_state_round_trip(backend, voice) -> None:
    restored = backend.voice_from_state(backend.voice_state(voice), voice.text)
    torch.testing.assert_close(restored.features.speech_feat, voice.features.speech_feat, rtol=0, atol=0)
    assert restored.text == PROMPT_TEXT


@pytest.mark.parametrize("text", ["", "   ", "。！？"])
def test_empty_text_is_rejected(backend, voice, text) -> None:
    with pytest.raises(InputError, match="text"):
        list(backend.synthesize(SynthesisRequest(text=text, voice=voice)))


@pytest.mark.parametrize("seconds,match", [(0.3, "at least"), (31.0, "at most")])
def test_prompt_duration_limits(backend, seconds, match) -> None:
    audio = (0.1 * np.sin(np.arange(int(16000 * seconds)) * 0.05)).astype(np.float32)
    with pytest.raises(InputError, match=match):
        backend.prepare_voice(audio, 16000)


def test_unreadable_audio_is_rejected(backend) -> None:
    with pytest.raises(InputError):
        backend.prepare_voice(np.full(16000, math.nan, np.float32), 16000)


def test_mode_requirements(backend, voice) -> None:
    anonymous = backend.voice_from_state(backend.voice_state(voice), None)
    with pytest.raises(InputError, match="prompt_text"):
        list(backend.synthesize(SynthesisRequest(text="Hi.", voice=anonymous, mode=Mode.ZERO_SHOT)))
    with pytest.raises(InputError, match="instruction"):
        list(backend.synthesize(SynthesisRequest(text="Hi.", voice=voice, mode=Mode.INSTRUCT2)))


def test_verify_reports_and_names_bad_files(tiny_cosyvoice2_dir: Path, tmp_path: Path) -> None:
    report = "\n".join(verify(tiny_cosyvoice2_dir))
    assert "llm.pt: loaded" in report and "flow.pt: loaded" in report
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_cosyvoice2_dir.iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "hift.pt").unlink()
    (broken / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="hift.pt"):
        verify(broken)
    (broken / "llm.pt").unlink()
    with pytest.raises(ModelFileError, match="llm.pt"):
        verify(broken)


def test_each_split_segment_is_synthesised(backend, voice) -> None:
    segments = backend.frontend.text_sentences(LONG_TEXT)
    assert len(segments) == 2
    request = SynthesisRequest(text=LONG_TEXT, voice=voice, stream=False, fixed_length=30)
    (wav,) = backend.synthesize(request)
    assert wav.shape[0] == len(segments) * 30 * SAMPLES_PER_TOKEN
