"""Fish requests as the engine's core loop runs them: a `FishStream` per request over the model runner's
per-stream state (runner.py), and the calls the core makes each step, every one batched over the streams it
is given: prefill, one decode step (slow and fast transformer over all rows), and codec decodes of the
streams whose next chunk is ready, grouped by codec shape key.

Streaming schedule (S1 decodes once at the end; here the causal codec runs while frames arrive): the first
chunk once STREAM_FIRST_FRAMES frames can be decoded (~186 ms of audio), then every STREAM_FRAMES; a chunk
decodes every frame that is ready. The newest frame waits while it may still be the dropped last one.
A request made in one piece (`stream=False`) decodes all its codes in one codec call at the end, as S1 does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from cosyapp.backends.fish.runner import FishRunner, FishStreamState, codec_shape_key
from cosyapp.engine.types import SynthesisRequest

STREAM_FIRST_FRAMES = 4
STREAM_FRAMES = 16


@dataclass(eq=False)
class FishStream:
    request: SynthesisRequest
    lm: FishStreamState
    error: BaseException | None = None
    finished: bool = False

    # ---- what the scheduler reads (engine/scheduler.py StreamState) ----

    @property
    def needs_prefill(self) -> bool:
        return self.lm.produced == 0

    @property
    def decoding(self) -> bool:
        return not self.lm.finished

    @property
    def tokens_short(self) -> int:
        if not self.request.stream:
            return 1  # all of its audio comes at the end
        want = STREAM_FIRST_FRAMES if self.lm.decoded == 0 else STREAM_FRAMES
        return want - self.lm.decodable

    @property
    def audio_pending(self) -> bool:
        return not self.finished

    @property
    def audio_key(self) -> Hashable | None:
        if not self.request.stream or self.lm.decodable == 0:
            return None
        return codec_shape_key(self.lm, self.lm.decodable)


class FishServing:
    """The engine's model runner for Fish (engine/runner.py `ModelRunner`), over `FishRunner`."""

    run_ahead = 0

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.model_runner: FishRunner = backend.runner

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

    def vocode(self, states: Sequence[FishStream]) -> list[list[np.ndarray]]:
        started = time.perf_counter()
        audio: dict[int, list[np.ndarray]] = {id(state): [] for state in states}
        streamed = [state for state in states if state.request.stream and state.lm.decodable]
        if streamed:
            decoded = self.model_runner.codec_decode([(state.lm, state.lm.decodable) for state in streamed])
            for state, samples in zip(streamed, decoded):
                audio[id(state)].append(samples)
        for state in states:
            if not state.lm.finished:
                continue
            if not state.request.stream:
                audio[id(state)].append(self.backend.decode_frames(state.lm))
            state.finished = True  # generation is over and every usable frame is decoded
        for state in states:
            if state.request.stats is not None:
                state.request.stats.add("fish_codec", time.perf_counter() - started)
        return [audio[id(state)] for state in states]

    def close(self, state: FishStream) -> None:
        self.model_runner.release(state.lm)
