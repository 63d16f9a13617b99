"""How the engine core cuts a planned audio group into jobs for its audio threads (no model: a stand-in runner)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cosyapp.engine.core import AudioJob, EngineCore, ListSink
from cosyapp.engine.sizing import CoreThreads
from cosyapp.engine.types import SynthesisRequest


@dataclass(eq=False)
class ReadyState:
    """A stream whose LM is done and whose next chunk is always ready; `chunks` chunks in all."""
    audio_key: Any
    chunks: int
    needs_prefill: bool = False
    decoding: bool = False
    tokens_short: int = 0
    finished: bool = False

    @property
    def audio_pending(self) -> bool:
        return not self.finished


class ReadyRunner:
    """Streams named by their request text: "solo" ones have a key of their own, the others share one."""

    run_ahead = 0
    threads = CoreThreads(audio_workers=2, parallel_kernels=False)

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def open(self, request: SynthesisRequest, row: int) -> ReadyState:
        return ReadyState(audio_key=("solo", row) if request.text == "solo" else "shared", chunks=3)

    def prefill(self, states: Sequence[ReadyState]) -> None:
        pass

    def decode(self, states: Sequence[ReadyState]) -> None:
        pass

    def prepare_audio(self, states: Sequence[ReadyState]) -> list[ReadyState]:
        return list(states)

    def compute_audio(self, states: list[ReadyState]) -> list[np.ndarray]:
        return [np.ones(10, dtype=np.float32) for _ in states]

    def finish_audio(self, states: Sequence[ReadyState], chunks: list[np.ndarray]) -> list[list[np.ndarray]]:
        for state in states:
            state.chunks -= 1
            state.finished = state.chunks == 0
        return [[chunk] for chunk in chunks]

    def close(self, state: ReadyState) -> None:
        pass


def held_core(streams: list[str]) -> tuple[EngineCore, list[tuple[AudioJob, Callable[[], Any]]]]:
    """A core with two audio slots cut in two parts, whose dispatched jobs wait in a list until the test runs them;
    one stream per text in `streams`, oldest first."""
    dispatched: list[tuple[AudioJob, Callable[[], Any]]] = []
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    core = EngineCore(ReadyRunner(len(streams)), 24000, clock=clock, audio_slots=2, audio_parts=2,
                      first_chunk_alone=False, dispatch_audio=lambda job, compute: dispatched.append((job, compute)))
    for text in streams:
        core.add(SynthesisRequest(text=text, voice=None), ListSink())
    return core, dispatched


def finish(core: EngineCore, dispatched: list[tuple[AudioJob, Callable[[], Any]]], index: int) -> None:
    job, compute = dispatched[index]
    core.audio_computed(job, compute(), None)


def test_a_group_is_cut_into_one_part_per_slot_when_every_slot_is_free() -> None:
    core, dispatched = held_core(["shared"] * 8)
    core.step()
    assert [len(job.tickets) for job, _ in dispatched] == [4, 4]


def test_with_one_slot_free_a_part_starts_and_the_rest_waits_for_the_next_free_slot() -> None:
    core, dispatched = held_core(["solo"] + ["shared"] * 7)
    core.step()  # the oldest stream's group: itself alone, in one slot
    core.step()  # the seven others' group with one slot left: a part of 4 (7 in two parts), the other 3 wait
    assert [len(job.tickets) for job, _ in dispatched] == [1, 4]
    waiting = [t for t in core.scheduler.running if not t.audio_busy and t.state.audio_key == "shared"]
    assert len(waiting) == 3
    core.step()  # no slot free: nothing starts
    assert len(dispatched) == 2
    finish(core, dispatched, 0)
    core.step()  # a slot is free again: the 3 that waited go first (no audio yet), as a part of 2 of them
    assert len(dispatched) == 3 and set(dispatched[2][0].tickets) < set(waiting)
    assert len(dispatched[2][0].tickets) == 2


def test_every_stream_gets_all_its_chunks_when_the_jobs_finish_out_of_order() -> None:
    core, dispatched = held_core(["solo", "solo"] + ["shared"] * 5)
    sinks = [stream.sink for stream in core.streams.values()]
    done = 0
    for _ in range(100):  # 7 streams x 3 chunks need far fewer steps
        if not core.has_work():
            break
        core.step()
        for index in reversed(range(done, len(dispatched))):  # the newest job first, then the older ones
            finish(core, dispatched, index)
        done = len(dispatched)
    assert not core.has_work()
    assert all(sink.ended and sink.error is None and len(sink.chunks) == 3 for sink in sinks)


def test_a_group_of_streams_with_audio_buffered_starts_whole_on_the_free_thread() -> None:
    core, dispatched = held_core(["solo"] + ["shared"] * 7)
    for ticket in core.scheduler.running:
        ticket.first_audio_at, ticket.audio_s = 0.0, 100.0  # every listener has plenty of audio
    core.step()
    core.step()
    assert [len(job.tickets) for job, _ in dispatched] == [1, 7]  # one batch beats an earlier start
