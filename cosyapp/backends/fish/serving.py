"""Fish requests as the engine's core loop runs them: a `FishStream` per request over the model runner's
per-stream state (runner.py), and the calls the core makes each step, every one batched over the streams it
is given: prefill, one decode step (slow and fast transformer over all rows), and codec decodes of the
streams whose next chunk is ready, grouped by codec shape key.

Streaming schedule (S1 decodes once at the end; here the causal codec runs while frames arrive): the first
chunk is STREAM_FIRST_FRAMES frames (~186 ms of audio), then chunks of STREAM_FRAMES, the last one what is
left. Fixed chunk sizes make the codec calls of streams at different positions one shape (`codec_shape_key`),
so the core computes them in one batched call. The newest frame waits while it may still be the dropped last
one.
A request made in one piece (`stream=False`) decodes all its codes in one codec call at the end, as S1 does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from cosyapp.backends.fish.runner import FishRunner, FishStreamState, codec_shape_key
from cosyapp.engine.sizing import core_threads
from cosyapp.engine.types import SynthesisRequest

STREAM_FIRST_FRAMES = 4
STREAM_FRAMES = 16


@dataclass(eq=False)
class FishStream:
    request: SynthesisRequest
    lm: FishStreamState
    error: BaseException | None = None
    finished: bool = False
    frames_in_work: int = 0  # frames of the codec call under way (`lm.decoded` counts them once it is done)

    # ---- what the scheduler reads (engine/scheduler.py StreamState) ----

    @property
    def needs_prefill(self) -> bool:
        return self.lm.produced == 0

    @property
    def decoding(self) -> bool:
        return not self.lm.finished

    @property
    def chunk_frames(self) -> int:
        """Frames of the next streaming chunk."""
        return STREAM_FIRST_FRAMES if self.lm.decoded + self.frames_in_work == 0 else STREAM_FRAMES

    @property
    def decodable(self) -> int:
        """Frames ready for the next codec call (those of a call under way are taken)."""
        return self.lm.decodable - self.frames_in_work

    @property
    def tokens_short(self) -> int:
        if not self.request.stream:
            return 1  # all of its audio comes at the end
        return self.chunk_frames - self.decodable

    def next_chunk_frames(self) -> int:
        """Frames the next codec call decodes: a chunk, or the rest once generation is over (maybe 0)."""
        if self.decodable >= self.chunk_frames:
            return self.chunk_frames
        return self.decodable if self.lm.finished else 0

    @property
    def audio_pending(self) -> bool:
        return not self.finished

    @property
    def audio_key(self) -> Hashable | None:
        frames = self.next_chunk_frames()
        if not self.request.stream or frames == 0:
            return None
        return codec_shape_key(self.lm, frames)


@dataclass
class FishAudioWork:
    """The codec calls of one audio step: streaming chunks (stream, frames) and whole utterances made in one piece."""
    chunks: list[tuple[FishStream, int]]
    whole: list[FishStream]


class FishServing:
    """The engine's model runner for Fish (engine/runner.py `ModelRunner`), over `FishRunner`."""

    run_ahead = 0

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.model_runner: FishRunner = backend.runner
        self.threads = core_threads(backend.device, self.model_runner.rows, backend.codec)

    @property
    def rows(self) -> int:
        return self.model_runner.rows

    def open(self, request: SynthesisRequest, row: int) -> FishStream:
        return FishStream(request, self.backend.start_stream(request, row))

    def prefill(self, states: Sequence[FishStream]) -> None:
        self._timed(states, "fish_lm", self.model_runner.prefill)

    def decode(self, states: Sequence[FishStream]) -> None:
        self._timed(states, "fish_lm", self.model_runner.decode_step)

    def _timed(self, states: Sequence[FishStream], stage: str, call: Any) -> None:
        started = time.perf_counter()
        call([state.lm for state in states])
        for state in states:
            if state.request.stats is not None:
                state.request.stats.add(stage, time.perf_counter() - started)

    def prepare_audio(self, states: Sequence[FishStream]) -> FishAudioWork:
        work = [(state, state.next_chunk_frames()) for state in states if state.request.stream]
        work = [(state, frames) for state, frames in work if frames]
        for state, frames in work:
            state.frames_in_work = frames
        whole = [state for state in states if not state.request.stream and state.lm.finished]
        return FishAudioWork(work, whole)

    def compute_audio(self, work: FishAudioWork) -> dict[int, list[np.ndarray]]:
        started = time.perf_counter()
        audio: dict[int, list[np.ndarray]] = {}
        if work.chunks:
            decoded = self.model_runner.codec_decode([(state.lm, frames) for state, frames in work.chunks])
            for (state, _), samples in zip(work.chunks, decoded):
                audio[id(state)] = [samples]
        for state in work.whole:
            audio[id(state)] = [self.backend.decode_frames(state.lm)]
        for state in [state for state, _ in work.chunks] + work.whole:
            if state.request.stats is not None:
                state.request.stats.add("fish_codec", time.perf_counter() - started)
        return audio

    def finish_audio(self, states: Sequence[FishStream], audio: dict[int, list[np.ndarray]]) -> list[list[np.ndarray]]:
        for state in states:
            state.frames_in_work = 0
            if not state.lm.finished:
                continue
            if not state.request.stream or state.lm.decodable == 0:
                state.finished = True  # generation is over and every usable frame is decoded
        return [audio.get(id(state), []) for state in states]

    def close(self, state: FishStream) -> None:
        self.model_runner.release(state.lm)
