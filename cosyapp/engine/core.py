"""The core loop: one per loaded backend, the only place its model runs.

Each step asks the scheduler (scheduler.py) what to run, calls the backend's model runner (runner.py) with
batched inputs and hands finished chunks to their sinks; the engine's sinks put them on the event loop with
`call_soon_threadsafe`. `EngineCore` is the step logic on whatever thread calls it (`run_alone` drives one
request on the caller's thread, for the command line and benchmarks); `CoreLoop` runs it on the backend's own
thread, which sleeps on a condition while there is nothing to do and is woken by new work or a cancellation.
Other model work of the backend (voice preparation, codec calls) runs on that thread too, between steps.

The loop's thread uses every core for its intra-op work: one step is all the model work there is, whatever
the number of streams, so a lone stream gets the whole machine and many streams share its batched calls. (With
two backends loaded, both loops use every core; they compete only while both have streams.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from cosyapp.engine.runner import ModelRunner
from cosyapp.engine.scheduler import Scheduler, Ticket
from cosyapp.engine.sizing import cpu_cores
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


class _Placeholder:
    """The scheduler's view of a stream before the runner has opened its state: nothing to run yet."""
    needs_prefill = decoding = audio_pending = finished = False
    tokens_short = 1
    audio_key = None


class EngineCore:
    def __init__(self, runner: ModelRunner, sample_rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.sample_rate = sample_rate
        self.clock = clock
        self.scheduler = Scheduler(runner.rows, runner.run_ahead)
        self.streams: dict[Ticket, CoreStream] = {}
        self.steps = 0
        self.decode_batches: dict[int, int] = {}  # decode batch size -> steps, for tests and benchmarks
        self.audio_batches: dict[int, int] = {}  # audio group size -> steps

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

    def step(self) -> None:
        """Drop cancelled streams, open newly seated ones, then run what the scheduler plans."""
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
        plan = self.scheduler.plan(self.clock())
        if plan.prefill:
            self._call(self.runner.prefill, plan.prefill)
        if plan.decode:
            self.decode_batches[len(plan.decode)] = self.decode_batches.get(len(plan.decode), 0) + 1
            self._call(self.runner.decode, plan.decode)
        if plan.audio:
            self.audio_batches[len(plan.audio)] = self.audio_batches.get(len(plan.audio), 0) + 1
            started = self.clock()
            chunks = self._call(self.runner.vocode, plan.audio)
            self.scheduler.observe_audio_step(self.clock() - started)
            for ticket, pieces in zip(plan.audio, chunks or ()):
                if ticket in self.streams:
                    for piece in pieces:
                        self._deliver(self.streams[ticket], piece)
        for stream in list(self.streams.values()):
            if stream.state is not None and stream.state.finished:
                self._end(stream, None)
        if plan.empty() and self.streams and all(s.state is not None for s in self.streams.values()) \
                and self.scheduler.running:
            # Nothing to run although streams hold rows: a runner left its states inconsistent. Failing them beats
            # a loop that spins (or sleeps) for ever.
            for ticket in list(self.scheduler.running):
                self._end(self.streams[ticket], RuntimeError("the stream stalled: nothing left to compute"))

    def _call(self, method: Callable[[list[Any]], Any], tickets: Sequence[Ticket]) -> Any:
        try:
            with torch.inference_mode():
                result = method([t.state for t in tickets])
        except BaseException as exc:  # the call's streams fail with it; the loop goes on
            for ticket in tickets:
                if ticket in self.streams:
                    self._end(self.streams[ticket], exc)
            return None
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
        if stream.state is not None:
            try:
                self.runner.close(stream.state)
            except Exception as exc:  # releasing must not take the loop down; the stream reports its own end
                error = error or exc
        if error is None and stream.held:
            stream.sink.chunk(np.concatenate(stream.held))
        outcome = "completed" if error is None else "cancelled" if isinstance(error, Cancelled) else "failed"
        stream.sink.end(error, outcome, stream.samples / self.sample_rate)


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
    """An `EngineCore` on its own thread. `submit` and `call` may be used from any thread."""

    def __init__(self, runner: ModelRunner, sample_rate: int, name: str, threads: int | None = None) -> None:
        self.core = EngineCore(runner, sample_rate)
        self.threads = threads or cpu_cores()
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

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
            self._wake.notify()

    def close(self) -> None:
        """Stop once the streams still running have ended (cancel them first); blocks until the thread is gone."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _post(self, item: Callable[[], None]) -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._inbox.append(item)
            self._wake.notify()

    def _idle(self) -> bool:
        return not self._inbox and not self.core.has_work()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while self._idle() and not self._closing:
                    self._wake.wait()
                if self._idle() and self._closing:
                    return
                items = list(self._inbox)
                self._inbox.clear()
            for item in items:
                item()
            if self.core.has_work():
                try:
                    self.core.step()
                except Exception as exc:  # a bug outside the runner's calls: its streams fail, the loop lives on
                    self.core.cancel_all(exc)
