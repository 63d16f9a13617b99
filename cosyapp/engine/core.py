"""The core loop: one per loaded backend, the only place its model runs.

Each step asks the scheduler (scheduler.py) what to run, calls the backend's model runner (runner.py) with
batched inputs and hands finished chunks to their sinks; the engine's sinks put them on the event loop with
`call_soon_threadsafe`. `EngineCore` is the step logic on whatever thread calls it (`run_alone` drives one
request on the caller's thread, for the command line and benchmarks); `CoreLoop` runs it on the backend's own
thread, which sleeps on a condition while there is nothing to do and is woken by new work, a computed audio
group or a cancellation. Other model work of the backend (voice preparation, codec calls) runs on that thread
too, between steps.

Audio beside the LM: the LM's decode step reads every weight for one token per stream (memory-bound; a
second core hardly speeds it up), while the flow and vocoder are compute-bound. So `CoreLoop` computes audio
groups (`compute_audio`, which touches only its streams' audio caches) on its audio threads while its own
thread goes on with the prefill and decode steps, and applies each result (`finish_audio`) on its own thread
at the next step. A stream has at most one group in the works. How many groups run at once, how many streams
one holds and whether kernels split across cores follow the device and the model (sizing.py `core_threads`).
Where they split, each thread sets torch's intra-op count to its share of the cores before its work (the LM
and the busy audio threads share them; whichever is alone gets them all), and a group holding a first chunk
runs alone, the LM waiting for it; else every thread runs one intra-op thread and a first chunk only goes
first.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from cosyapp.engine.runner import ModelRunner
from cosyapp.engine.scheduler import Scheduler, Ticket
from cosyapp.engine.sizing import CoreThreads, cpu_cores
from cosyapp.engine.types import Cancelled, SynthesisRequest


class StreamSink(Protocol):
    """Where a stream's output goes. Called on the core's thread."""

    def chunk(self, audio: np.ndarray) -> None: ...

    def end(self, error: BaseException | None, outcome: str, audio_seconds: float) -> None:
        """The stream is over: outcome "completed" (error None), "cancelled" or "failed"."""
        ...


@dataclass(eq=False)
class CoreStream:
    request: SynthesisRequest
    sink: StreamSink
    ticket: Ticket
    state: Any = None  # the runner's state, opened once the stream holds a row
    samples: int = 0
    held: list[np.ndarray] = field(default_factory=list)  # a non-streaming request's chunks, sent at the end


_NOTHING = object()  # a failed call's answer where None is a valid one


class _Placeholder:
    """The scheduler's view of a stream before the runner has opened its state: nothing to run yet."""
    needs_prefill = decoding = audio_pending = finished = False
    tokens_short = 1
    audio_key = None


@dataclass(eq=False)
class AudioJob:
    """One audio group between `prepare_audio` and `finish_audio`."""
    tickets: list[Ticket]
    work: Any  # prepare_audio's answer, compute_audio's input
    started: float
    first_chunk: bool  # a listener waits for its first audio: nothing else starts until it is back


# Runs an audio job's `compute` somewhere and later calls `computed(job, result, error)` on the core's thread.
AudioDispatch = Callable[[AudioJob, Callable[[], Any]], None]


class EngineCore:
    """The step logic. Without `dispatch_audio` an audio group is computed inline within the step; with it, the
    group is handed over and the step goes on (`audio_computed` brings the result back): at most `audio_slots`
    groups in the works at once, a planned group cut into `audio_parts` parts (`_audio_parts`). `first_chunk_alone`: a
    group holding a first chunk runs alone and the LM waits for it (for calls that use every core); else first
    chunks only go first."""

    def __init__(self, runner: ModelRunner, sample_rate: int, clock: Callable[[], float] = time.monotonic,
                 dispatch_audio: AudioDispatch | None = None, audio_slots: int = 1, audio_parts: int = 1,
                 first_chunk_alone: bool = True) -> None:
        self.runner = runner
        self.sample_rate = sample_rate
        self.clock = clock
        self.dispatch_audio = dispatch_audio
        self.scheduler = Scheduler(runner.rows, runner.run_ahead)
        self.streams: dict[Ticket, CoreStream] = {}
        self.audio_slots = audio_slots
        self.audio_parts = audio_parts
        self.first_chunk_alone = first_chunk_alone
        self.audio_jobs: list[AudioJob] = []  # groups being computed elsewhere
        self.steps = 0
        self.decode_batches: dict[int, int] = {}  # decode batch size -> steps, for tests and benchmarks
        self.audio_batches: dict[int, int] = {}  # audio group size -> steps
        self.overlapped_steps = 0  # LM steps run while an audio group was being computed
        self.most_audio_jobs = 0  # most audio groups in the works at once

    def add(self, request: SynthesisRequest, sink: StreamSink) -> None:
        ticket = Ticket(_Placeholder(), self.clock(), streaming=request.stream)
        self.streams[ticket] = CoreStream(request, sink, ticket)
        self.scheduler.add(ticket)

    def has_work(self) -> bool:
        return bool(self.streams)

    def cancel_all(self, error: BaseException | None = None) -> None:
        """End every stream (with `error`, default Cancelled)."""
        for stream in list(self.streams.values()):
            self._end(stream, error or Cancelled())

    def lm_pending(self) -> bool:
        """Whether some stream has LM work left (a sentence to prefill or tokens to decode)."""
        return any(t.state.needs_prefill or t.state.decoding for t in self.scheduler.running)

    def step(self) -> bool:
        """Drop cancelled streams, open newly seated ones, then run what the scheduler plans; False when there
        was nothing to run (every stream waits for its audio group)."""
        self.steps += 1
        for stream in list(self.streams.values()):
            if stream.request.cancel.is_set():
                self._end(stream, Cancelled())
        for ticket in list(self.scheduler.running):
            stream = self.streams[ticket]
            if stream.state is None:
                try:
                    stream.state = self.runner.open(stream.request, ticket.row)
                    ticket.state = stream.state
                except BaseException as exc:
                    self._end(stream, exc)
        exclusive = any(job.first_chunk for job in self.audio_jobs)
        audio_free = len(self.audio_jobs) < self.audio_slots and not exclusive
        plan = self.scheduler.plan(self.clock(), audio_free=audio_free, lm_free=not exclusive)
        if plan.audio:
            for part in self._audio_parts(plan.audio):
                self._start_audio(part)
            if self.dispatch_audio is not None and any(job.first_chunk for job in self.audio_jobs):
                plan.prefill, plan.decode = [], []  # the LM waits for the first chunk (Scheduler.first_chunk)
        if self.audio_jobs and (plan.prefill or plan.decode):
            self.overlapped_steps += 1
        if plan.prefill:
            self._call(self.runner.prefill, plan.prefill)
        if plan.decode:
            self.decode_batches[len(plan.decode)] = self.decode_batches.get(len(plan.decode), 0) + 1
            self._call(self.runner.decode, plan.decode)
        self._end_finished()
        if plan.empty() and not self.audio_jobs and self.streams \
                and all(s.state is not None for s in self.streams.values()) and self.scheduler.running:
            # Nothing to run although streams hold rows: a runner left its states inconsistent. Failing them beats
            # a loop that spins (or sleeps) for ever.
            for ticket in list(self.scheduler.running):
                self._end(self.streams[ticket], RuntimeError("the stream stalled: nothing left to compute"))
        return not plan.empty()

    def _audio_parts(self, group: list[Ticket]) -> list[list[Ticket]]:
        """The parts of a planned group (most urgent first) that start now, each on a free audio thread. A group
        holding a first chunk is cut into `audio_parts` equal parts and as many start as threads are free; the
        rest wait for the next free thread rather than make someone's first chunk wait on one thread while
        another core goes idle. Any other group starts whole on the free threads: streams with audio buffered
        gain more from one batch than from an earlier start."""
        parts = max(1, min(self.audio_parts, len(group)))
        free = self.audio_slots - len(self.audio_jobs)
        if not self.scheduler.first_chunk(group):
            parts = max(1, min(parts, free))
        size = -(-len(group) // parts)
        return [group[start:start + size] for start in range(0, min(len(group), free * size), size)]

    def _start_audio(self, tickets: list[Ticket]) -> None:
        self.audio_batches[len(tickets)] = self.audio_batches.get(len(tickets), 0) + 1
        work = self._call(self.runner.prepare_audio, tickets, _NOTHING)
        if work is _NOTHING:
            return
        job = AudioJob(tickets, work, self.clock(), self.first_chunk_alone and self.scheduler.first_chunk(tickets))
        for ticket in tickets:
            ticket.audio_busy = True
        self.audio_jobs.append(job)
        self.most_audio_jobs = max(self.most_audio_jobs, len(self.audio_jobs))

        def compute() -> Any:
            with torch.inference_mode():
                return self.runner.compute_audio(work)

        if self.dispatch_audio is None:
            try:
                result = compute()
            except BaseException as exc:
                self.audio_computed(job, None, exc)
            else:
                self.audio_computed(job, result, None)
        else:
            self.dispatch_audio(job, compute)

    def audio_computed(self, job: AudioJob, result: Any, error: BaseException | None) -> None:
        """An audio group's compute is over (on the core's thread): its chunks go out; streams that ended
        meanwhile are released now."""
        self.audio_jobs.remove(job)
        self.scheduler.observe_audio_step(self.clock() - job.started)
        for ticket in job.tickets:
            ticket.audio_busy = False
        for ticket in job.tickets:
            if ticket not in self.streams:
                self._close(ticket.state)  # it ended while its audio was computed
        if error is not None:
            for ticket in job.tickets:
                if ticket in self.streams:
                    self._end(self.streams[ticket], error)
            return
        chunks = self._call(lambda states: self.runner.finish_audio(states, result), job.tickets)
        for ticket, pieces in zip(job.tickets, chunks or ()):
            if ticket in self.streams:
                for piece in pieces:
                    self._deliver(self.streams[ticket], piece)
        self._end_finished()

    def _end_finished(self) -> None:
        for stream in list(self.streams.values()):
            if stream.state is not None and stream.state.finished and not stream.ticket.audio_busy:
                self._end(stream, None)

    def _call(self, method: Callable[[list[Any]], Any], tickets: Sequence[Ticket], failed: Any = None) -> Any:
        """`method` over the tickets' states; an exception fails those streams and answers `failed`."""
        try:
            with torch.inference_mode():
                result = method([t.state for t in tickets])
        except BaseException as exc:  # the call's streams fail with it; the loop goes on
            for ticket in tickets:
                if ticket in self.streams:
                    self._end(self.streams[ticket], exc)
            return failed
        for ticket in tickets:
            error = getattr(ticket.state, "error", None)
            if error is not None and ticket in self.streams:
                self._end(self.streams[ticket], error)
        return result

    def _deliver(self, stream: CoreStream, audio: np.ndarray) -> None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size == 0:
            return  # nothing to send; the first real chunk defines the time to first byte
        stream.samples += audio.shape[0]
        if not stream.request.stream:
            stream.held.append(audio)
            return
        ticket = stream.ticket
        if ticket.first_audio_at is None:
            ticket.first_audio_at = self.clock()
        ticket.audio_s += audio.shape[0] / self.sample_rate
        stream.sink.chunk(audio)

    def _end(self, stream: CoreStream, error: BaseException | None) -> None:
        if self.streams.pop(stream.ticket, None) is None:
            return
        self.scheduler.remove(stream.ticket)
        if stream.state is not None and not stream.ticket.audio_busy:  # else once its audio group is back
            close_error = self._close(stream.state)
            error = error or close_error
        if error is None and stream.held:
            stream.sink.chunk(np.concatenate(stream.held))
        outcome = "completed" if error is None else "cancelled" if isinstance(error, Cancelled) else "failed"
        stream.sink.end(error, outcome, stream.samples / self.sample_rate)

    def _close(self, state: Any) -> BaseException | None:
        """Release a stream's state; releasing must not take the loop down (the error is the stream's to report)."""
        try:
            self.runner.close(state)
        except Exception as exc:
            return exc
        return None


class ListSink:
    """Collects a stream's chunks for a caller that drives the core itself."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.error: BaseException | None = None
        self.ended = False

    def chunk(self, audio: np.ndarray) -> None:
        self.chunks.append(audio)

    def end(self, error: BaseException | None, outcome: str, audio_seconds: float) -> None:
        self.error, self.ended = error, True


def run_alone(runner: ModelRunner, request: SynthesisRequest, sample_rate: int) -> Iterator[np.ndarray]:
    """One request through the core's steps on the calling thread: its chunks as they are made. The same
    schedule and runner calls as in the engine, with nobody else in the batch. Not to be mixed with a running
    engine of the same backend (both would use the runner's rows)."""
    core = EngineCore(runner, sample_rate)
    sink = ListSink()
    core.add(request, sink)
    try:
        while core.has_work():
            core.step()
            while sink.chunks:
                yield sink.chunks.popleft()
        while sink.chunks:
            yield sink.chunks.popleft()
        if sink.error is not None:
            raise sink.error
    finally:
        core.cancel_all()


class CoreLoop:
    """An `EngineCore` on its own thread, with `sizing.audio_workers` threads for its audio groups (module
    docstring). `submit` and `call` may be used from any thread."""

    def __init__(self, runner: ModelRunner, sample_rate: int, name: str, sizing: CoreThreads,
                 threads: int | None = None) -> None:
        self.threads = threads or cpu_cores()
        self.parallel_kernels = sizing.parallel_kernels
        audio_workers = sizing.audio_workers
        # A first chunk computed on one intra-op thread leaves the other cores to the LM and the other groups; one
        # split across the cores takes them all, and the LM waits for it.
        self.core = EngineCore(runner, sample_rate, dispatch_audio=self._dispatch_audio, audio_slots=audio_workers,
                               audio_parts=sizing.group_parts, first_chunk_alone=sizing.parallel_kernels)
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._waiting = False  # the last step had nothing to run: sleep until something arrives
        self._audio_work: deque[tuple[AudioJob, Callable[[], Any], int]] = deque()
        self._audio_wake = threading.Condition()
        self._audio_busy = 0  # audio threads computing a group
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._audio_threads = [threading.Thread(target=self._run_audio, name=f"engine-{name}-audio{i or ''}",
                                                daemon=True) for i in range(audio_workers)]
        self._thread.start()
        for thread in self._audio_threads:
            thread.start()

    def submit(self, request: SynthesisRequest, sink: StreamSink) -> None:
        """Start a stream at the next step."""
        self._post(lambda: self.core.add(request, sink))

    def call(self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run other model work between steps; `done(result, error)` is called on the core's thread."""
        def job() -> None:
            try:
                result = work()
            except BaseException as exc:
                done(None, exc)
            else:
                done(result, None)
        self._post(job)

    def wake(self) -> None:
        """Look at the streams now (one was cancelled)."""
        with self._wake:
            self._waiting = False
            self._wake.notify()

    def close(self) -> None:
        """Stop once the streams still running have ended (cancel them first); blocks until the threads are gone."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        with self._audio_wake:
            self._audio_wake.notify_all()
        for thread in self._audio_threads:
            thread.join()

    def _post(self, item: Callable[[], None], closing_too: bool = False) -> None:
        with self._wake:
            if self._closing and not closing_too:
                raise RuntimeError("the engine is closed")
            self._inbox.append(item)
            self._waiting = False
            self._wake.notify()

    def _idle(self) -> bool:
        return not self._inbox and (self._waiting or not self.core.has_work())

    def _done(self) -> bool:
        return self._closing and not self._inbox and not self.core.has_work() and not self.core.audio_jobs

    def _share(self, lm: bool) -> int:
        """Intra-op threads for one piece of work while the LM (if `lm`) and the busy audio threads share the
        cores; one when the runner's kernels are too small to split (sizing.py `core_threads`)."""
        if not self.parallel_kernels:
            return 1
        return max(1, self.threads // (int(lm) + self._audio_busy))

    def _run(self) -> None:
        threads = 0
        while True:
            with self._wake:
                while self._idle() and not self._done():
                    self._wake.wait()
                if self._done():
                    return
                items = list(self._inbox)
                self._inbox.clear()
            for item in items:
                item()
            if self.core.has_work():
                wanted = self._share(lm=True)
                if wanted != threads:
                    torch.set_num_threads(wanted)
                    threads = wanted
                try:
                    ran = self.core.step()
                except Exception as exc:  # a bug outside the runner's calls: its streams fail, the loop lives on
                    self.core.cancel_all(exc)
                    ran = True
                with self._wake:
                    # Nothing ran: every stream waits for its audio group, which posts its result (or a new stream,
                    # call or cancellation arrives); until then there is no point in stepping.
                    self._waiting = not ran and not self._inbox

    def _dispatch_audio(self, job: AudioJob, compute: Callable[[], Any]) -> None:
        """On the core's thread: hand the group to an audio thread, with its share of the cores (a first chunk
        shares them with no LM step: the LM waits for it)."""
        with self._audio_wake:
            self._audio_busy += 1
            self._audio_work.append((job, compute, self._share(lm=self.core.lm_pending() and not job.first_chunk)))
            self._audio_wake.notify()

    def _run_audio(self) -> None:
        while True:
            with self._audio_wake:
                while not self._audio_work and not self._loop_gone():
                    self._audio_wake.wait()
                if not self._audio_work:
                    return
                job, compute, threads = self._audio_work.popleft()
            torch.set_num_threads(threads)
            try:
                result, error = compute(), None
            except BaseException as exc:  # the group's streams fail with it (`audio_computed`)
                result, error = None, exc
            with self._audio_wake:
                self._audio_busy -= 1
            self._post(functools.partial(self.core.audio_computed, job, result, error), closing_too=True)

    def _loop_gone(self) -> bool:
        return self._closing and not self._thread.is_alive()
