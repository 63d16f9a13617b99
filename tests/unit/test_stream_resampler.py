"""The streaming resampler (server/resample.py): however the audio is cut into chunks, the streamed output is the
offline resampling of the whole signal, so chunk joins leave no trace."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from cosyapp.server.resample import ResampledStream, StreamResampler

RATE_PAIRS = [(24000, 8000), (24000, 16000), (24000, 22050), (44100, 8000), (44100, 16000), (44100, 22050),
              (24000, 48000), (44100, 48000)]


def offline(signal: np.ndarray, source: int, target: int) -> np.ndarray:
    return AF.resample(torch.from_numpy(signal), source, target).numpy()


def streamed(signal: np.ndarray, source: int, target: int, cuts: list[int]) -> list[np.ndarray]:
    resampler = StreamResampler(source, target)
    pieces = [resampler.push(chunk) for chunk in np.split(signal, cuts)]
    return [*pieces, resampler.flush()]


@pytest.mark.parametrize("source, target", RATE_PAIRS)
def test_streamed_output_is_the_offline_resampling_whatever_the_chunks(source: int, target: int) -> None:
    rng = np.random.default_rng(source + target)
    for _ in range(4):
        signal = (0.3 * rng.standard_normal(int(rng.integers(1, 40000)))).astype(np.float32)
        cuts = sorted(rng.integers(0, signal.shape[0], int(rng.integers(0, 12))).tolist())
        out = np.concatenate(streamed(signal, source, target, cuts))
        reference = offline(signal, source, target)
        assert out.shape == reference.shape
        np.testing.assert_allclose(out, reference, atol=2e-5)


def test_a_tone_cut_into_chunks_has_no_step_at_the_joins() -> None:
    """A 440 Hz tone in 40 ms chunks, 24 kHz -> 16 kHz: the step across each join is no larger than the tone's own
    largest sample-to-sample step (a seam would add a click there)."""
    t = np.arange(24000) / 24000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pieces = streamed(tone, 24000, 16000, list(range(960, 24000, 960)))
    out = np.concatenate(pieces)
    joins = np.cumsum([piece.shape[0] for piece in pieces])[:-1]
    steps = np.abs(np.diff(out))
    inner = steps[1000:-1000].max()  # away from the fade in and out at the ends of the whole signal
    assert all(steps[j - 1] <= inner * 1.001 for j in joins if 1000 < j < out.shape[0] - 1000)
    assert joins.size > 10


def test_resampled_stream_yields_no_empty_chunk_and_cancels_the_synthesis() -> None:
    class Source:
        def __init__(self, chunks: list[np.ndarray]) -> None:
            self.chunks = chunks
            self.cancelled = False

        async def _iterate(self):
            for chunk in self.chunks:
                yield chunk

        def __aiter__(self):
            return self._iterate()

        def cancel(self) -> None:
            self.cancelled = True

    signal = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    source = Source([signal[:3], signal[3:4000], signal[4000:4001], signal[4001:]])

    async def collect() -> list[np.ndarray]:
        return [chunk async for chunk in ResampledStream(source, 44100, 16000)]

    chunks = asyncio.run(collect())
    assert all(chunk.shape[0] > 0 for chunk in chunks)
    np.testing.assert_allclose(np.concatenate(chunks), offline(signal, 44100, 16000), atol=2e-5)
    stream = ResampledStream(source, 44100, 16000)
    stream.cancel()
    assert source.cancelled


def test_resampled_stream_resamples_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resampling call, the last one (flush) included, runs on a worker thread, not the event loop's."""
    threads: list[tuple[str, int]] = []
    for name in ("push", "flush"):
        def recording(self, *args, _name=name, _call=getattr(StreamResampler, name)):
            threads.append((_name, threading.get_ident()))
            return _call(self, *args)
        monkeypatch.setattr(StreamResampler, name, recording)

    class Source:
        async def _iterate(self):
            yield np.ones(3000, dtype=np.float32)

        def __aiter__(self):
            return self._iterate()

    async def collect() -> tuple[list[np.ndarray], int]:
        return [chunk async for chunk in ResampledStream(Source(), 24000, 16000)], threading.get_ident()

    chunks, loop_thread = asyncio.run(collect())
    assert sum(chunk.shape[0] for chunk in chunks) == 2000
    assert [name for name, _ in threads] == ["push", "flush"]
    assert all(thread != loop_thread for _, thread in threads)
