"""The sample rate a client asks for: audio resampled on the server while it streams.

`StreamResampler` resamples a stream of float32 chunks with torchaudio's windowed-sinc kernel (the one
`torchaudio.functional.resample` uses) and keeps the input it still needs between chunks: each output sample is
computed only once the input its kernel reaches on both sides has arrived, so the streamed result is, sample for
sample, the resampling of the whole utterance at once. Nothing is restarted at a chunk join, hence no clicks;
the price is a delay of a few milliseconds of input (the kernel's half width) until the stream ends.

`ResampledStream` puts one in front of a synthesis stream; the speech service uses it for requests that name a
`sample_rate` (speech.py).
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Protocol

import numpy as np
import torch
from torchaudio.transforms import Resample


class StreamResampler:
    """Float32 mono chunks at `source_rate` in, the same signal at `target_rate` out, in order, without seams."""

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate, self.target_rate = source_rate, target_rate
        self._kernel = Resample(source_rate, target_rate)  # the windowed-sinc kernel, computed once
        divisor = math.gcd(source_rate, target_rate)
        # One step of the polyphase filter: `_hop` input samples give `_out` output samples.
        self._hop, self._out = source_rate // divisor, target_rate // divisor
        # Input kept on each side of the samples being computed: the kernel's reach, in whole steps.
        self._context = -(-self._kernel.width // self._hop) * self._hop
        self._pending = np.zeros(self._context, dtype=np.float32)  # the kernel sees zeros before the start
        self._received = 0
        self._sent = 0

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """The output samples that `chunk` completes (possibly none)."""
        self._received += chunk.shape[0]
        self._pending = np.concatenate([self._pending, np.asarray(chunk, dtype=np.float32)])
        return self._compute((self._pending.shape[0] - 2 * self._context) // self._hop)

    def flush(self) -> np.ndarray:
        """The rest, once the input has ended (the kernel sees zeros after it, as for a whole signal)."""
        remaining = math.ceil(self.target_rate * self._received / self.source_rate) - self._sent
        steps = -(-remaining // self._out)
        if steps <= 0:
            return np.zeros(0, dtype=np.float32)
        missing = self._context + steps * self._hop + self._context - self._pending.shape[0]
        self._pending = np.concatenate([self._pending, np.zeros(max(missing, 0), dtype=np.float32)])
        out = self._compute(steps)[:remaining]
        self._sent -= steps * self._out - out.shape[0]  # the last step's samples past the end are dropped
        return out

    def _compute(self, steps: int) -> np.ndarray:
        if steps <= 0:
            return np.zeros(0, dtype=np.float32)
        window = self._pending[:self._context + steps * self._hop + self._context]
        with torch.inference_mode():
            resampled = self._kernel(torch.from_numpy(window)).numpy()
        skip = self._context // self._hop * self._out
        out = resampled[skip:skip + steps * self._out]
        self._pending = self._pending[steps * self._hop:]
        self._sent += out.shape[0]
        return out


class AudioStream(Protocol):
    """What a synthesis stream offers its reader: chunks, and a way to stop it."""

    def __aiter__(self) -> AsyncIterator[np.ndarray]: ...

    def cancel(self) -> None: ...


class ResampledStream:
    """A synthesis stream's chunks resampled to `target_rate` (the resampling runs off the event loop); never yields
    an empty chunk. `cancel` cancels the synthesis."""

    def __init__(self, stream: AudioStream, source_rate: int, target_rate: int) -> None:
        self._stream = stream
        self._chunks = aiter(stream)
        self._resampler = StreamResampler(source_rate, target_rate)
        self._ended = False

    def __aiter__(self) -> ResampledStream:
        return self

    async def __anext__(self) -> np.ndarray:
        while not self._ended:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._ended = True
                out = await asyncio.to_thread(self._resampler.flush)
            else:
                out = await asyncio.to_thread(self._resampler.push, chunk)
            if out.shape[0]:
                return out
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._stream.cancel()
