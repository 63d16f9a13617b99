"""The engine: runs a blocking backend on worker threads for an asyncio server.

- Admission: at most `max_concurrent` requests synthesize at once and at most `max_queue` more wait for a
  slot; beyond that `admit()` raises `EngineBusy` at once (the server answers 503 + Retry-After) instead of
  queueing without bound.
- Streaming: a worker thread iterates `backend.synthesize(request)` and hands each chunk to the event loop
  with `call_soon_threadsafe` into an asyncio queue, so the loop never blocks and never polls.
- Cancellation: `SynthesisStream.cancel()` (client gone) sets `request.cancel`; the backend stops with
  `Cancelled` at its next chunk (CosyVoice2: once it has the tokens of the chunk it is waiting for), and the slot is freed when the worker thread has really stopped.
- Other model work (codec encoding and decoding) runs in a slot as well (`run`).
- Voices: prepared prompt voices are cached by a caller-chosen key (a content hash of an upload, a speaker
  id + version); concurrent requests for the same key share one preparation.

Streams share the model inside the backend (CosyVoice2: every stream's LM decoding on one batcher thread,
lm_batcher.py; chunks at the same point of their schedule computed together, token2wav.py); the engine only
admits, feeds and cancels the worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from cosyapp.engine.types import Backend, BackendInfo, Cancelled, SynthesisRequest, Voice


class EngineBusy(Exception):
    """Every stream slot and queue place is taken; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"server busy: all synthesis slots and queue places are taken; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class EngineStats:
    admitted: int = 0
    rejected: int = 0  # EngineBusy
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    active: int = 0  # worker threads running a request now
    in_flight: int = 0  # admitted and not finished (active + waiting for a slot)
    voice_cache_hits: int = 0
    voice_cache_misses: int = 0
    audio_seconds: float = 0.0


class Admission:
    """A request's place in the engine, held from `Engine.admit()` until its work is over.

    The caller releases it if it fails before `Engine.start`; after that the stream owns it. Idempotent.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine.stats.in_flight -= 1


T = TypeVar("T")

# Queue items after the audio chunks: the end of the stream, or why it stopped.
_END = object()


@dataclass(frozen=True)
class _Stopped:
    error: BaseException


class SynthesisStream:
    """Async iterator of float32 chunks from one running request. Raises the backend's error (e.g. an
    InputError, or Cancelled) where the stream stopped."""

    def __init__(self, request: SynthesisRequest, queue: asyncio.Queue) -> None:
        self.request = request
        self._queue = queue
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


def _failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


class Engine:
    def __init__(self, backend: Backend, max_concurrent: int, max_queue: int, retry_after_s: int = 2,
                 voice_cache_size: int = 64) -> None:
        self.backend = backend
        self.info: BackendInfo = backend.info()
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.stats = EngineStats()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._workers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="synth")
        # Prompt extraction runs beside synthesis on its own threads (uploads must not wait for a stream slot).
        self._voice_workers = ThreadPoolExecutor(max(1, min(4, max_concurrent)), thread_name_prefix="voice")
        self._voices: OrderedDict[str, asyncio.Future[Voice]] = OrderedDict()
        self._voice_cache_size = voice_cache_size
        self._running: set[threading.Event] = set()  # cancel events of the requests on worker threads

    def admit(self) -> Admission:
        """Take a place (a slot or a queue place) or raise EngineBusy. Cheap; call it before heavy work."""
        if self.stats.in_flight >= self.max_concurrent + self.max_queue:
            self.stats.rejected += 1
            raise EngineBusy(self.retry_after_s)
        self.stats.in_flight += 1
        self.stats.admitted += 1
        return Admission(self)

    async def voice(self, key: str, prepare: Callable[[], Voice]) -> Voice:
        """The voice cached under `key`, else `prepare()` run on a worker thread (its errors propagate and are
        not cached)."""
        future = self._voices.get(key)
        if future is not None and not _failed(future):
            self._voices.move_to_end(key)
            self.stats.voice_cache_hits += 1
        else:
            self.stats.voice_cache_misses += 1
            future = asyncio.get_running_loop().run_in_executor(self._voice_workers, prepare)
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

    async def start(self, request: SynthesisRequest, admission: Admission) -> SynthesisStream:
        """Wait for a free slot, then start synthesizing on a worker thread. The stream owns `admission`
        from here on; the slot and the admission are released when the worker has stopped."""
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.stats.active += 1
        self._running.add(request.cancel)
        try:
            self._workers.submit(self._work, loop, queue, request, admission)
        except BaseException:
            self._finish(request, admission, "failed", 0.0)
            raise
        return SynthesisStream(request, queue)

    async def run(self, work: Callable[[], T], admission: Admission) -> T:
        """Run blocking model work other than a synthesis (codec encoding and decoding) in a synthesis slot on a
        worker thread, so it counts against the same limit. Owns `admission` like `start`; the slot is freed when
        the work has really stopped (a caller that goes away does not stop the thread)."""
        try:
            await self._slots.acquire()
        except BaseException:
            admission.release()
            raise
        self.stats.active += 1

        def finished(_: asyncio.Future) -> None:
            self.stats.active -= 1
            admission.release()
            self._slots.release()

        try:
            future = asyncio.get_running_loop().run_in_executor(self._workers, work)
        except BaseException:
            finished(None)
            raise
        future.add_done_callback(finished)
        return await asyncio.shield(future)

    def _work(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, request: SynthesisRequest,
              admission: Admission) -> None:
        """Worker thread: run the backend and forward its chunks to the event loop."""
        samples = 0
        outcome = "completed"
        try:
            with contextlib.closing(self.backend.synthesize(request)) as chunks:
                for chunk in chunks:
                    chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
                    if chunk.size == 0:
                        continue  # nothing to send; the first real chunk defines the time to first byte
                    samples += chunk.shape[0]
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                    request.check_cancelled()
            loop.call_soon_threadsafe(queue.put_nowait, _END)
        except Cancelled as e:
            outcome = "cancelled"
            self._post(loop, queue.put_nowait, _Stopped(e))
        except BaseException as e:  # handed to the consumer; the worker thread itself must survive
            outcome = "failed"
            self._post(loop, queue.put_nowait, _Stopped(e))
        finally:
            self._post(loop, self._finish, request, admission, outcome, samples / self.info.sample_rate)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody is listening
            pass

    def _finish(self, request: SynthesisRequest, admission: Admission, outcome: str, audio_seconds: float) -> None:
        self._running.discard(request.cancel)
        self.stats.active -= 1
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self.stats.audio_seconds += audio_seconds
        admission.release()
        self._slots.release()

    def snapshot(self) -> dict[str, Any]:
        """Counters plus limits, for /stats and tests."""
        return {**asdict(self.stats), "waiting": self.stats.in_flight - self.stats.active,
                "max_concurrent": self.max_concurrent, "max_queue": self.max_queue}

    async def close(self) -> None:
        """Cancel everything still running and wait for the worker threads to stop."""
        for cancel in list(self._running):
            cancel.set()
        await asyncio.to_thread(self._workers.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._voice_workers.shutdown, wait=True, cancel_futures=True)
