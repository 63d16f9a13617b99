"""Streams through the engine's core loop on the tiny models (CPU): what a stream gets does not depend on what runs
beside it, a cancelled stream leaves (and frees its row) at the next step, a failing stream fails alone.

The core is mostly stepped by hand here (no thread, audio computed within the step), so "started together" and
"at random offsets" are exact step numbers; the last tests run the core's own two threads (`CoreLoop`: audio
groups computed beside the LM steps) and hold it to the same outputs. Tokens must be identical: each stream samples its own rows with its own generator, and batching only
changes the last bits of the logits. Audio may differ by float rounding: a batched flow/vocoder call (or a
batched codec call) runs its matrix products over several rows at once, which the CPU's GEMM kernels block and
sum in another order than for one row (float32: about 1e-7 relative per operation); the flow's 10 Euler steps and
the vocoder's upsampling stack carry that to about 1e-5 of full scale. AUDIO_ATOL allows 10x that.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend
from cosyapp.backends.fish.backend import FishBackend
from cosyapp.engine.core import CoreLoop, EngineCore, ListSink
from cosyapp.engine.engine import backend_runner
from cosyapp.engine.sizing import CoreThreads
from cosyapp.engine.types import Cancelled, InputError, Mode, SynthesisRequest

AUDIO_ATOL = 1e-4
PROMPT_WAV = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"
TEXTS = ["Hello there, how are you?", "The weather is lovely today.", "Let us take a long walk by the river.",
         "Good morning."]
ROWS = 4


class Harness:
    """A backend, its voice, how to read the tokens of a stream's state, and how many tokens to force."""

    def __init__(self, backend: Any, voice: Any, tokens_of: Callable[[Any], list], length: int) -> None:
        self.backend, self.voice, self.tokens_of, self.length = backend, voice, tokens_of, length
        self.runner = backend_runner(backend, ROWS)
        self.rate = backend.info().sample_rate

    def request(self, index: int, **extra: Any) -> SynthesisRequest:
        fields = {"fixed_length": self.length + 7 * index, **extra}
        return SynthesisRequest(text=TEXTS[index % len(TEXTS)], voice=self.voice, mode=Mode.CROSS_LINGUAL,
                                seed=100 + index, **fields)


@pytest.fixture(scope="module", params=["cosyvoice2", "fish"])
def harness(request: pytest.FixtureRequest) -> Harness:
    torch.set_num_threads(2)
    wav, rate = sf.read(PROMPT_WAV, dtype="float32")
    if request.param == "cosyvoice2":
        backend = CosyVoice2Backend(request.getfixturevalue("tiny_cosyvoice2_dir"), device="cpu", max_streams=ROWS)
        return Harness(backend, backend.prepare_voice(wav, rate), lambda state: list(state.tokens), 40)
    backend = FishBackend(request.getfixturevalue("tiny_fish_dir"), device="cpu", max_streams=ROWS)
    return Harness(backend, backend.prepare_voice(wav[: rate * 2], rate),
                   lambda state: state.lm.frames_so_far().tolist(), 12)


class Run:
    """Requests added to one core at given steps; the core stepped until every stream has ended."""

    def __init__(self, harness: Harness, requests: list[SynthesisRequest], starts: list[int],
                 on_step: Callable[["Run", int], None] | None = None) -> None:
        self.core = EngineCore(harness.runner, harness.rate)
        self.states: dict[int, Any] = {}
        self.sinks = [ListSink() for _ in requests]
        open_state = harness.runner.open

        def recording_open(request: SynthesisRequest, row: int) -> Any:
            state = open_state(request, row)
            self.states[next(i for i, r in enumerate(requests) if r is request)] = state
            return state

        harness.runner.open = recording_open
        try:
            step = 0
            while step <= max(starts) or self.core.has_work():
                for index, start in enumerate(starts):
                    if start == step:
                        self.core.add(requests[index], self.sinks[index])
                if on_step is not None:
                    on_step(self, step)
                if self.core.has_work():
                    self.core.step()
                step += 1
                assert step < 10_000, "the core did not finish"
        finally:
            del harness.runner.open

    def audio(self, index: int) -> np.ndarray:
        sink = self.sinks[index]
        assert sink.ended and sink.error is None, sink.error
        return np.concatenate(list(sink.chunks))


def alone(harness: Harness, index: int, **extra: Any) -> tuple[list, np.ndarray]:
    run = Run(harness, [harness.request(index, **extra)], [0])
    return harness.tokens_of(run.states[0]), run.audio(0)


def assert_same_as_alone(harness: Harness, run: Run, indices: list[int]) -> None:
    for index in indices:
        tokens, audio = alone(harness, index)
        assert harness.tokens_of(run.states[index]) == tokens
        together = run.audio(index)
        assert together.shape == audio.shape
        np.testing.assert_allclose(together, audio, rtol=0, atol=AUDIO_ATOL)


def test_streams_started_together_get_what_they_get_alone(harness: Harness) -> None:
    run = Run(harness, [harness.request(i) for i in range(ROWS)], [0] * ROWS)
    assert max(run.core.decode_batches) == ROWS  # every row in one forward per step
    assert max(run.core.audio_batches) >= 2  # chunks at the same point of the schedule in one batched call
    assert_same_as_alone(harness, run, list(range(ROWS)))


def test_streams_started_at_random_offsets_get_what_they_get_alone(harness: Harness) -> None:
    starts = random.Random(7).sample(range(0, 25), ROWS)
    run = Run(harness, [harness.request(i) for i in range(ROWS)], starts)
    assert max(run.core.decode_batches) >= 2
    assert_same_as_alone(harness, run, list(range(ROWS)))


def test_a_cancelled_stream_frees_its_row_at_the_next_step(harness: Harness) -> None:
    requests = [harness.request(i) for i in range(3)]
    seen: dict[str, int] = {}

    def cancel_mid_chunk(run: Run, step: int) -> None:
        state = run.states.get(1)
        if "cancelled_at" not in seen and state is not None and run.sinks[1].chunks and state.decoding:
            requests[1].cancel.set()  # it has audio out and is decoding towards its next chunk
            seen["cancelled_at"], seen["free_before"] = step, run.core.scheduler.pool.free
        elif seen.get("cancelled_at") == step - 1:
            seen["free_after"] = run.core.scheduler.pool.free

    run = Run(harness, requests, [0, 0, 0], on_step=cancel_mid_chunk)
    assert seen["free_after"] == seen["free_before"] + 1  # one step later its row is back in the pool
    assert isinstance(run.sinks[1].error, Cancelled)
    assert_same_as_alone(harness, run, [0, 2])


def test_a_stream_whose_backend_raises_fails_alone(harness: Harness) -> None:
    requests = [harness.request(0), harness.request(1, fixed_length=10**6), harness.request(2)]
    run = Run(harness, requests, [0, 0, 0])
    assert isinstance(run.sinks[1].error, InputError)
    assert run.core.scheduler.pool.free == ROWS
    assert_same_as_alone(harness, run, [0, 2])


def threaded_run(harness: Harness, requests: list[SynthesisRequest], delays: list[float],
                 cancel: tuple[int, int] | None = None, sizing: CoreThreads = CoreThreads(2, True),
                 meet_s: float = 0.0) -> tuple[CoreLoop, dict[int, Any], list[ListSink]]:
    """The requests through a `CoreLoop` (its loop and audio threads), submitted `delays` seconds apart (the first
    ones without a delay reach the core in one step: the loop is held while they are submitted); `cancel`
    (index, chunks): cancel that request once it has had that many chunks. `meet_s`: until two audio groups have
    been computed at once, a group computed alone waits up to that long for a second one to start (so that the
    test sees two at once whenever the core allows it, however the machine's load times the streams).
    -> the loop, states and sinks."""
    states: dict[int, Any] = {}
    open_state, compute_audio = harness.runner.open, harness.runner.compute_audio
    computing, second_started, lock = [0], threading.Event(), threading.Lock()

    def recording_open(request: SynthesisRequest, row: int) -> Any:
        state = open_state(request, row)
        states[next(i for i, r in enumerate(requests) if r is request)] = state
        return state

    def meeting_compute_audio(work: Any) -> Any:
        with lock:
            computing[0] += 1
            if computing[0] > 1:
                second_started.set()
            alone = computing[0] == 1
        try:
            if alone and meet_s and not second_started.is_set():
                second_started.wait(meet_s)
            return compute_audio(work)
        finally:
            with lock:
                computing[0] -= 1

    harness.runner.open, harness.runner.compute_audio = recording_open, meeting_compute_audio
    loop = CoreLoop(harness.runner, harness.rate, "test", sizing, threads=2)
    sinks = [ListSink() for _ in requests]
    held = threading.Event()
    loop.call(lambda: held.wait(10), lambda result, error: None)
    try:
        for request, sink, delay in zip(requests, sinks, delays):
            if delay:
                held.set()
                time.sleep(delay)
            loop.submit(request, sink)
        held.set()
        deadline = time.monotonic() + 120
        while not all(sink.ended for sink in sinks):
            if cancel is not None and len(sinks[cancel[0]].chunks) >= cancel[1]:
                requests[cancel[0]].cancel.set()
                loop.wake()
            assert time.monotonic() < deadline, "the core loop did not finish"
            time.sleep(0.005)
    finally:
        loop.close()
        del harness.runner.open, harness.runner.compute_audio
    return loop, states, sinks


# How a core uses the machine (sizing.py `core_threads`): a CPU with kernels split across its cores (a first chunk
# alone), a CPU with one intra-op thread per core thread (a group cut into one part per core), and a GPU (one group
# at a time; CosyVoice2 streams batched wherever they are in their schedules).
SIZINGS = {"kernels-split": CoreThreads(2, True), "groups-cut": CoreThreads(2, False),
           "gpu-like": CoreThreads(1, True)}


@pytest.mark.parametrize("sizing", SIZINGS.values(), ids=SIZINGS.keys())
def test_streams_on_the_core_threads_get_what_they_get_alone(harness: Harness, sizing: CoreThreads,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if sizing.audio_workers == 1 and hasattr(harness.backend, "token2wav"):
        monkeypatch.setattr(harness.backend.token2wav, "batch_positions", True)  # as on a GPU
    requests = [harness.request(i) for i in range(ROWS)]
    loop, states, sinks = threaded_run(harness, requests, [0.0, 0.0, 0.05, 0.1], sizing=sizing, meet_s=0.5)
    assert loop.core.overlapped_steps > 0  # LM steps ran while an audio group was being computed
    if sizing.audio_workers > 1:
        assert loop.core.most_audio_jobs == 2  # two groups computed at once, on the two audio threads
    else:  # streams went through one batched call (CosyVoice2: streams at different points of their schedules)
        assert max(loop.core.audio_batches) > 1
    assert loop.core.scheduler.pool.free == ROWS and not loop.core.audio_jobs
    for index in range(ROWS):
        tokens, audio = alone(harness, index)
        assert harness.tokens_of(states[index]) == tokens
        assert sinks[index].error is None
        np.testing.assert_allclose(np.concatenate(list(sinks[index].chunks)), audio, rtol=0, atol=AUDIO_ATOL)


def test_a_stream_cancelled_on_the_core_threads_leaves_the_others_unchanged(harness: Harness) -> None:
    requests = [harness.request(i) for i in range(3)]
    loop, states, sinks = threaded_run(harness, requests, [0.0, 0.0, 0.0], cancel=(1, 1))
    assert isinstance(sinks[1].error, Cancelled)
    assert loop.core.scheduler.pool.free == ROWS and not loop.core.streams
    for index in (0, 2):
        tokens, audio = alone(harness, index)
        assert harness.tokens_of(states[index]) == tokens
        np.testing.assert_allclose(np.concatenate(list(sinks[index].chunks)), audio, rtol=0, atol=AUDIO_ATOL)
