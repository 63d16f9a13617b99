"""The bounded CosyVoice3 streaming flow with a left-context window (`flow_left_chunks`) on the tiny model:
its DiT caches and attention stay bounded along a long utterance, and -1 (every chunk) is the unwindowed path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice3.backend import CosyVoice3Backend
from cosyapp.backends.cosyvoice3.estimator import DiTCache
from cosyapp.backends.cosyvoice3.token2wav import Token2Wav
from cosyapp.engine.registry import load_backend
from cosyapp.engine.types import Mode

TOKENS = 300  # 12 s: far past a window of one chunk


@pytest.fixture(scope="module")
def backend(tiny_cosyvoice3_dir: Path) -> CosyVoice3Backend:
    return load_backend("cosyvoice3", tiny_cosyvoice3_dir, device="cpu", dtype="float32", max_streams=1)


@pytest.fixture(scope="module")
def prompt(backend: CosyVoice3Backend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = np.arange(24000 * 2) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    voice = backend.prepare_voice(audio, 24000)
    text_ids = backend.frontend.text_sentences("Hello.")[0]
    model_input = backend.frontend.build_model_input(Mode.CROSS_LINGUAL, text_ids, voice.features)
    return model_input.flow_prompt_speech_token, model_input.prompt_speech_feat, model_input.flow_embedding


def stream_chunks(backend: CosyVoice3Backend, prompt, left_chunks: int | None, exact: bool = False,
                  on_push=None) -> list[torch.Tensor]:
    token2wav = Token2Wav(backend.flow, backend.hift, backend.config, exact=exact, left_chunks=left_chunks)
    session = token2wav.new_stream(*prompt)
    tokens = torch.randint(0, backend.config.flow.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(7))
    chunks = []
    for token in tokens.tolist():
        chunks += session.push([token])
        if on_push is not None:
            on_push(session)
    return chunks + [session.finish()]


def test_windowed_caches_and_attention_stay_bounded(backend: CosyVoice3Backend, prompt,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    left_chunks = 1
    chunk = backend.config.flow.estimator.static_chunk_size  # frames
    pinned = prompt[1].size(1)  # the prompt's mel frames
    held, keys_per_call = [], []
    attention_mask = DiTCache.attention_mask

    def record(cache: DiTCache, new: int, device: torch.device, chunk_size: int) -> torch.Tensor:
        mask = attention_mask(cache, new, device, chunk_size)
        keys_per_call.append((mask.size(-1), new))
        return mask

    monkeypatch.setattr(DiTCache, "attention_mask", record)
    chunks = stream_chunks(backend, prompt, left_chunks,
                           on_push=lambda session: held.append(max(c.keys[0].size(2) for c in session.caches)))
    assert len(chunks) >= 5 and all(torch.isfinite(c).all() for c in chunks)
    frames = backend.config.token_mel_ratio * (prompt[0].size(1) + TOKENS)
    assert max(held) <= pinned + (left_chunks + 1) * chunk < frames / 3
    assert all(keys <= pinned + (left_chunks + 1) * chunk + new for keys, new in keys_per_call)


def test_every_left_chunk_is_the_unwindowed_path(backend: CosyVoice3Backend, prompt) -> None:
    """-1 keeps every key: the chunks are upstream's re-run chunks (all but the last, see the backend tests)."""
    windowless = stream_chunks(backend, prompt, -1)
    exact = stream_chunks(backend, prompt, None, exact=True)
    assert [len(c) for c in windowless] == [len(c) for c in exact]
    for ours, theirs in zip(windowless[:-1], exact[:-1]):
        assert (ours - theirs).abs().max() < 1e-4


def test_window_departs_only_past_its_reach(backend: CosyVoice3Backend, prompt) -> None:
    """A window of 8 chunks sees everything the first chunks see: those are the unwindowed ones."""
    windowed = stream_chunks(backend, prompt, 8)
    full = stream_chunks(backend, prompt, -1)
    assert [len(c) for c in windowed] == [len(c) for c in full]
    assert torch.equal(windowed[0], full[0]) and torch.equal(windowed[1], full[1])
