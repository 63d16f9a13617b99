"""The engine the server talks to: admission, streams and other model work of one backend, on asyncio.

- Admission: at most `max_concurrent` requests synthesize at once and at most `max_queue` more wait for a
  slot; beyond that `admit()` raises `EngineBusy` at once (the server answers 503 + Retry-After). A request
  whose task is cancelled while it waits for a slot gives its place back at once.
- Streaming: `start` hands the request to the backend's core loop (core.py), whose thread runs every model
  call of the backend; each chunk comes back with `call_soon_threadsafe` into the stream's asyncio queue, so
  the event loop never blocks and never polls.
- Cancellation: `SynthesisStream.cancel()` (client gone) sets `request.cancel` and wakes the core, which
  drops the stream at its next step and frees its row; the slot is freed once the core has let go of it.
- Other model work (voice preparation, codec encoding and decoding) runs on the core's thread too, between
  steps; codec work holds a slot like a synthesis (`run`).
- Voices: prepared prompt voices are cached by a caller-chosen key (a content hash of an upload, a speaker
  id + version); concurrent requests for the same key share one preparation.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from cosyapp.engine.core import CoreLoop
from cosyapp.engine.runner import GeneratorRunner, ModelRunner
from cosyapp.engine.scheduler import Admission, AdmissionLimit, EngineBusy
from cosyapp.engine.types import Backend, BackendInfo, SynthesisRequest, Voice


@dataclass
class EngineStats:
    admitted: int = 0
    rejected: int = 0  # EngineBusy
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    active: int = 0  # requests holding a slot now
    in_flight: int = 0  # admitted and not finished (active + waiting for a slot)
    voice_cache_hits: int = 0
    voice_cache_misses: int = 0
    audio_seconds: float = 0.0


T = TypeVar("T")

# Queue items after the audio chunks: the end of the stream, or why it stopped.
_END = object()


@dataclass(frozen=True)
class _Stopped:
    error: BaseException


class SynthesisStream:
    """Async iterator of float32 chunks from one running request. Raises the backend's error (e.g. an
    InputError, or Cancelled) where the stream stopped."""

    def __init__(self, request: SynthesisRequest, queue: asyncio.Queue, wake: Callable[[], None]) -> None:
        self.request = request
        self._queue = queue
        self._wake = wake
        self._finished = False

    def __aiter__(self) -> SynthesisStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, np.ndarray):
            return item
        self._finished = True
        if isinstance(item, _Stopped):
            raise item.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the generation (no-op once it has finished). Safe to call from `finally` of a cancelled task."""
        self.request.cancel.set()
        self._wake()


class _LoopSink:
    """A stream's chunks and end, from the core's thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 finished: Callable[[str, float], None]) -> None:
        self.loop, self.queue, self.finished = loop, queue, finished

    def chunk(self, audio: np.ndarray) -> None:
        _post(self.loop, self.queue.put_nowait, audio)

    def end(self, error: BaseException | None, outcome: str, audio_seconds: float) -> None:
        _post(self.loop, self.queue.put_nowait, _END if error is None else _Stopped(error))
        _post(self.loop, self.finished, outcome, audio_seconds)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the server is shutting down and nobody is listening
        pass


def _failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def backend_runner(backend: Backend, max_concurrent: int) -> ModelRunner:
    """What the core drives for a backend: its `stream_runner`, or one that drives its `synthesize` a chunk per
    step."""
    runner = getattr(backend, "stream_runner", None)
    return runner if runner is not None else GeneratorRunner(backend, max_concurrent)


class Engine:
    def __init__(self, backend: Backend, max_concurrent: int, max_queue: int, retry_after_s: int = 2,
                 voice_cache_size: int = 64) -> None:
        self.backend = backend
        self.info: BackendInfo = backend.info()
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.stats = EngineStats()
        self._limit = AdmissionLimit(max_concurrent, max_queue, retry_after_s)
        self._slots = asyncio.Semaphore(max_concurrent)
        runner = backend_runner(backend, max_concurrent)
        self.core = CoreLoop(runner, self.info.sample_rate, backend.name, runner.threads)
        self._voices: OrderedDict[str, asyncio.Future[Voice]] = OrderedDict()
        self._voice_cache_size = voice_cache_size
        self._running: set[SynthesisStream] = set()

    def admit(self) -> Admission:
        """Take a place (a slot or a queue place) or raise EngineBusy. Cheap; call it before heavy work."""
        try:
            self._limit.take()
        except EngineBusy:
            self.stats.rejected += 1
            raise
        self.stats.in_flight = self._limit.in_flight
        self.stats.admitted += 1
        return _TrackedAdmission(self)

    async def _on_core(self, work: Callable[[], T]) -> T:
        """`work()` on the core's thread, between steps."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.cancelled():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            _post(loop, settle)

        self.core.call(work, done)
        return await future

    async def voice(self, key: str, prepare: Callable[[], Voice]) -> Voice:
        """The voice cached under `key`, else `prepare()` run on the core's thread (its errors propagate and are
        not cached)."""
        future = self._voices.get(key)
        if future is not None and not _failed(future):
            self._voices.move_to_end(key)
            self.stats.voice_cache_hits += 1
        else:
            self.stats.voice_cache_misses += 1
            future = asyncio.ensure_future(self._on_core(prepare))
            self._voices[key] = future
            future.add_done_callback(lambda f: self._forget_failed(key, f))
            self._evict_voices()
        # shield: one waiting request going away must not cancel a preparation others share.
        return await asyncio.shield(future)

    def _forget_failed(self, key: str, future: asyncio.Future) -> None:
        if _failed(future) and self._voices.get(key) is future:
            del self._voices[key]

    def _evict_voices(self) -> None:
        while len(self._voices) > self._voice_cache_size:
            oldest = next(iter(self._voices))
            if not self._voices[oldest].done():
                break  # never drop a preparation somebody is waiting for
            del self._voices[oldest]

    async def _take_slot(self, admission: Admission) -> None:
        """Wait for a free slot; a caller that goes away meanwhile gives its queue place back at once."""
        try:
            await self._slots.acquire()
        except BaseException:
            admission.release()
            raise
        self.stats.active += 1

    def _free_slot(self, admission: Admission) -> None:
        self.stats.active -= 1
        admission.release()
        self._slots.release()

    async def start(self, request: SynthesisRequest, admission: Admission) -> SynthesisStream:
        """Wait for a free slot, then hand the request to the core loop. The stream owns `admission` from here
        on; the slot and the admission are released when the core has let go of the stream."""
        await self._take_slot(admission)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = SynthesisStream(request, queue, self.core.wake)

        def finished(outcome: str, audio_seconds: float) -> None:
            self._running.discard(stream)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self.stats.audio_seconds += audio_seconds
            self._free_slot(admission)

        self._running.add(stream)
        try:
            self.core.submit(request, _LoopSink(loop, queue, finished))
        except BaseException:
            self._running.discard(stream)
            self.stats.failed += 1
            self._free_slot(admission)
            raise
        return stream

    async def run(self, work: Callable[[], T], admission: Admission) -> T:
        """Run model work other than a synthesis (codec encoding and decoding) in a synthesis slot on the core's
        thread, so it counts against the same limit. Owns `admission` like `start`; the slot is freed when the
        work has really stopped (a caller that goes away does not stop it)."""
        await self._take_slot(admission)
        try:
            future = asyncio.ensure_future(self._on_core(work))
        except BaseException:
            self._free_slot(admission)
            raise
        future.add_done_callback(lambda _: self._free_slot(admission))
        return await asyncio.shield(future)

    def snapshot(self) -> dict[str, Any]:
        """Counters plus limits, for /stats and tests."""
        return {**asdict(self.stats), "waiting": self.stats.in_flight - self.stats.active,
                "max_concurrent": self.max_concurrent, "max_queue": self.max_queue}

    async def close(self) -> None:
        """Cancel everything still running and wait for the core's thread to stop."""
        for stream in list(self._running):
            stream.cancel()
        await asyncio.to_thread(self.core.close)


class _TrackedAdmission(Admission):
    """An admission that keeps the engine's `in_flight` counter in step with the limit."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine._limit)
        self._engine = engine

    def release(self) -> None:
        super().release()
        self._engine.stats.in_flight = self._engine._limit.in_flight
