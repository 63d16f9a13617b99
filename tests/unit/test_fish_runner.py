"""The Fish model runner (runner.py) on the random tiny model: streams decoded together, in one batched forward
per step, get the codes they get alone and their audio within float tolerance.

Why a tolerance for audio and none for codes: a batched matrix product blocks its reduction differently from a
one-row product (on this CPU, rows agree only in blocks of 4), so a stream's logits in a batch differ from its
lone logits in the last float32 bits (about 1e-6 relative). Sampling draws each stream's noise from its own
generator, so a code could only change if two candidates tied to within that rounding: the codes are compared
exactly. The codec then runs the same kind of batched convolutions over a 30-layer causal decoder, where
last-bit differences grow by the decoder's gain (the random tiny codec drives its output to +-0.98): batched
against lone decodes of the same chunks differ by at most 1.35e-5 (measured on this CPU), the same size as
decoding one utterance in chunks against in one piece (1.1e-5; test_fish_backend allows 1e-4 there).
AUDIO_ATOL = 5e-5 leaves room for other CPUs' kernels while still catching a wrong row, a lost codec state or
a misplaced chunk (those differ by O(0.1))."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from cosyapp.backends.fish import backend as fish
from cosyapp.backends.fish.runner import FishRunner, FishStreamState
from cosyapp.backends.fish.serving import STREAM_FIRST_FRAMES, STREAM_FRAMES
from cosyapp.engine.types import SynthesisRequest

ROWS = 3
MAX_FRAMES = 30
AUDIO_ATOL = 5e-5
# (text, seed): prompts of 26, 60, 41 and 17 tokens; on the tiny model these stop on <|im_end|> after 22,
# (budget: 30), 27 and 19 frames (test_the_streams_cover_both_endings checks that the set has both endings).
STREAMS = [("Hello world.", 3), ("A somewhat longer sentence here, to be spoken.", 1),
           ("Numbers one, two and three.", 0), ("Hi.", 3)]


@pytest.fixture(scope="module")
def backend(tiny_fish_dir):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return fish.load(tiny_fish_dir, device="cpu", dtype="float32", max_streams=ROWS)


def request(backend, text: str, seed: int, stream: bool = True, fixed_length: int | None = None) -> SynthesisRequest:
    return SynthesisRequest(text=text, voice=backend.no_reference_voice(), seed=seed, stream=stream,
                            fixed_length=fixed_length, options={"max_new_tokens": MAX_FRAMES})


@dataclass
class Job:
    """One stream of a driven run: joins at step `start`, is released at step `cancel_at` if given."""

    text: str
    seed: int
    start: int = 0
    cancel_at: int | None = None
    fixed_length: int | None = None
    state: FishStreamState | None = None
    rows_used: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)


def drive(backend, jobs: list[Job]) -> None:
    """A minimal engine loop over the runner: a row pool, joins at their steps (all joiners of a step prefilled
    together), every live stream decoded each step, audio on the backend's streaming schedule with the ready
    streams of a step in one codec call, rows released when a stream finishes or is cancelled."""
    runner: FishRunner = backend.runner
    free_rows = list(range(runner.rows))
    waiting, live, step = list(jobs), [], 0
    while waiting or live:
        joining = [job for job in waiting if job.start <= step][: len(free_rows)]
        for job in joining:
            waiting.remove(job)
            row = free_rows.pop(0)
            job.rows_used.append(row)
            job.state = backend.start_stream(request(backend, job.text, job.seed, fixed_length=job.fixed_length), row)
        decoding = [job for job in live if not job.state.finished]
        if decoding:
            runner.decode_step([job.state for job in decoding])
        if joining:
            runner.prefill([job.state for job in joining])
            live += joining
        for job in [job for job in live if job.cancel_at is not None and step >= job.cancel_at]:
            runner.release(job.state)
            live.remove(job)
            free_rows.append(job.state.row)
        work = []
        for job in live:
            want = STREAM_FIRST_FRAMES if job.state.decoded == 0 else STREAM_FRAMES
            if job.state.decodable >= want or (job.state.finished and job.state.decodable):
                work.append((job, job.state.decodable))
        if work:
            audio = runner.codec_decode([(job.state, frames) for job, frames in work])
            for (job, _), samples in zip(work, audio):
                job.chunks.append(samples)
        for job in [job for job in live if job.state.finished and not job.state.decodable]:
            runner.release(job.state)
            live.remove(job)
            free_rows.append(job.state.row)
        step += 1


_lone_runs: dict[tuple[int, str, int, int | None], Job] = {}


def alone(backend, job: Job) -> Job:
    """The job's stream driven alone (computed once per stream and model)."""
    key = (id(backend), job.text, job.seed, job.fixed_length)
    if key not in _lone_runs:
        _lone_runs[key] = Job(job.text, job.seed, fixed_length=job.fixed_length)
        drive(backend, [_lone_runs[key]])
    return _lone_runs[key]


def assert_same_stream(backend, job: Job, reference: Job) -> None:
    assert torch.equal(job.state.frames_so_far(), reference.state.frames_so_far())
    assert [len(c) for c in job.chunks] == [len(c) for c in reference.chunks]
    np.testing.assert_allclose(np.concatenate(job.chunks), np.concatenate(reference.chunks), rtol=0, atol=AUDIO_ATOL)


def test_one_stream_equals_the_backend(backend):
    """The runner alone gives the frames the backend's own decoding loop gives, and the same audio."""
    for text, seed in STREAMS[:2]:
        frames = torch.cat(list(backend.generate_frames(request(backend, text, seed))), dim=1)
        job = alone(backend, Job(text, seed))
        assert torch.equal(job.state.frames_so_far(), frames)
        streamed = np.concatenate(list(backend.synthesize(request(backend, text, seed))))
        # The backend's chunks follow its stop-check blocks, the driver's the schedule: the codec's chunking
        # tolerance (test_fish_backend) applies, not the batching one.
        np.testing.assert_allclose(np.concatenate(job.chunks), streamed, rtol=0, atol=1e-4)


def test_the_streams_cover_both_endings(backend):
    """The stream set is worth its name: one ends on <|im_end|>, another on its budget."""
    ends = [alone(backend, Job(text, seed)).state for text, seed in STREAMS]
    assert any(state.stopped for state in ends)
    assert any(not state.stopped and state.produced == MAX_FRAMES for state in ends)


def test_streams_started_together_get_their_own_codes(backend):
    jobs = [Job(text, seed) for text, seed in STREAMS[:ROWS]]
    drive(backend, jobs)
    for job in jobs:
        assert_same_stream(backend, job, alone(backend, job))


def test_streams_joining_mid_decode_get_their_own_codes(backend):
    """Streams join at seeded random steps while others are mid-decode (two in the same step, prefilled
    together); with more streams than rows the last waits for a row another stream released."""
    offsets = sorted(random.Random(18).sample(range(1, 15), 2))
    jobs = [Job(*STREAMS[0], start=0), Job(*STREAMS[1], start=offsets[0]), Job(*STREAMS[2], start=offsets[0]),
            Job(*STREAMS[3], start=offsets[1])]
    drive(backend, jobs)
    assert jobs[3].rows_used[0] in jobs[0].rows_used + jobs[1].rows_used + jobs[2].rows_used  # a reused row
    for job in jobs:
        assert_same_stream(backend, job, alone(backend, job))


def test_a_released_row_serves_a_new_stream_unchanged(backend):
    """A stream cancelled mid-decode leaves the others unchanged, and its row, reused at once by a new stream,
    gives that stream its lone result."""
    cancelled = Job(*STREAMS[1], cancel_at=9)
    others = [Job(*STREAMS[0]), Job(*STREAMS[3], fixed_length=30)]
    newcomer = Job(*STREAMS[2], start=10)
    drive(backend, [cancelled, *others, newcomer])
    assert cancelled.state.released and cancelled.state.produced < MAX_FRAMES
    assert newcomer.rows_used == cancelled.rows_used
    for job in [*others, newcomer]:
        assert_same_stream(backend, job, alone(backend, job))


def test_whole_utterance_decode_equals_the_backend(backend):
    """Non-streaming: all frames through the codec at the end match the backend's one decode."""
    text, seed = STREAMS[0]
    state = backend.start_stream(request(backend, text, seed, stream=False), 0)
    backend.runner.prefill([state])
    while not state.finished:
        backend.runner.decode_step([state])
    (audio,) = backend.runner.codec_decode([(state, state.decodable)])
    backend.runner.release(state)
    (expected,) = list(backend.synthesize(request(backend, text, seed, stream=False)))
    assert audio.shape == expected.shape == ((state.produced - 1) * 2048,)
    np.testing.assert_allclose(audio, expected, rtol=0, atol=AUDIO_ATOL)


def test_misuse_is_refused(backend):
    runner = backend.runner
    a = backend.start_stream(request(backend, "One.", 1), 0)
    b = backend.start_stream(request(backend, "Two.", 2), 0)
    with pytest.raises(ValueError, match="share a cache row"):
        runner.prefill([a, b])
    with pytest.raises(ValueError, match="not yet prefilled"):
        runner.decode_step([a])
    runner.prefill([a])
    with pytest.raises(ValueError, match="already prefilled"):
        runner.prefill([a])
    with pytest.raises(ValueError, match="ready"):
        runner.codec_decode([(a, 1)])  # the only frame may be the dropped last one
    runner.release(a)
    with pytest.raises(ValueError, match="released"):
        runner.decode_step([a])
    with pytest.raises(ValueError, match="outside"):
        backend.start_stream(request(backend, "Three.", 3), runner.rows)


def test_codec_batches_streams_at_different_positions(backend):
    """Chunks of the same size from streams at different points of their utterances (other positions and
    attention windows in the codec) decode in one call, each equal to its lone decode; first chunks and
    chunks of other sizes go in calls of their own."""
    runner = backend.runner
    a, b = Job(*STREAMS[0], fixed_length=30), Job(*STREAMS[3], fixed_length=40)
    states = [backend.start_stream(request(backend, job.text, job.seed, fixed_length=job.fixed_length), row)
              for row, job in enumerate((a, b))]
    runner.prefill(states)
    while not all(state.finished for state in states):
        runner.decode_step([state for state in states if not state.finished])
    state_a, state_b = states
    batch_sizes: list[int] = []
    hook = backend.codec.decoder.register_forward_hook(lambda module, args, out: batch_sizes.append(len(args[0])))
    try:  # each stream on the schedule's chunks (4, 16, 16, ... the rest), b one chunk ahead of a
        b1, = runner.codec_decode([(state_b, 4)])
        b2, a1 = runner.codec_decode([(state_b, 16), (state_a, 4)])
        a2, b3 = runner.codec_decode([(state_a, 16), (state_b, 16)])  # codec positions 4 and 20: one call
        a3, b4 = runner.codec_decode([(state_a, 10), (state_b, 4)])
    finally:
        hook.remove()
        for state in states:
            runner.release(state)
    assert batch_sizes == [1, 1, 1, 2, 1, 1]
    for job, chunks in ((a, [a1, a2, a3]), (b, [b1, b2, b3, b4])):
        reference = alone(backend, job)
        assert [len(chunk) for chunk in chunks] == [len(chunk) for chunk in reference.chunks]
        np.testing.assert_allclose(np.concatenate(chunks), np.concatenate(reference.chunks), rtol=0, atol=AUDIO_ATOL)
