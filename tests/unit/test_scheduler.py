"""Engine scheduler: admission limits, streaming off the event loop, cancellation, failures, voice cache.

These tests use a small scripted backend defined here (the service and CLI tests run the real model)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cosyapp.engine.engine import Engine
from cosyapp.engine.scheduler import EngineBusy
from cosyapp.engine.types import BackendInfo, Cancelled, InputError, SynthesisRequest, Voice

SAMPLE_RATE = 1000


class ScriptedBackend:
    """Yields `chunks` chunks of 100 samples, `delay` seconds apart, honouring request.cancel like the real one.

    `gate`, when given, blocks the first chunk until it is set (to hold a slot as long as a test needs)."""

    name = "scripted"

    def __init__(self, chunks: int = 3, delay: float = 0.0, gate: threading.Event | None = None,
                 fail_after: int | None = None) -> None:
        self.chunks, self.delay, self.gate, self.fail_after = chunks, delay, gate, fail_after
        self.threads: set[str] = set()
        self.chunks_made = 0
        self.stopped = threading.Event()
        self.prepared = 0

    def info(self) -> BackendInfo:
        return BackendInfo("Scripted", "/nowhere", SAMPLE_RATE, ("cross_lingual",))

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, text: str | None = None) -> Voice:
        self.prepared += 1
        if audio.size == 0:
            raise InputError("empty prompt")
        time.sleep(0.05)
        return Voice(self.name, {"mean": float(audio.mean())}, text)

    def synthesize(self, request: SynthesisRequest):
        self.threads.add(threading.current_thread().name)
        try:
            if request.text == "bad":
                raise InputError("nothing to say")
            for i in range(self.chunks):
                if self.gate is not None:
                    while not self.gate.wait(0.01):
                        request.check_cancelled()
                request.check_cancelled()
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("model exploded")
                time.sleep(self.delay)
                self.chunks_made += 1
                yield np.full(100, 0.1 * (i + 1), dtype=np.float32)
        finally:
            self.stopped.set()


def _request(text: str = "hello") -> SynthesisRequest:
    return SynthesisRequest(text=text, voice=Voice("scripted", {}))


async def _eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_streams_chunks_in_order_on_the_core_threads():
    async def main():
        backend = ScriptedBackend(chunks=4)
        engine = Engine(backend, max_concurrent=2, max_queue=0)
        stream = await engine.start(_request(), engine.admit())
        chunks = [chunk async for chunk in stream]
        await _eventually(lambda: engine.stats.in_flight == 0)
        await engine.close()
        return backend, engine, chunks

    backend, engine, chunks = asyncio.run(main())
    assert [float(c[0]) for c in chunks] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert all(c.dtype == np.float32 and c.shape == (100,) for c in chunks)
    # A backend without a runner of its own makes its chunks as the core's audio work, on the core's audio thread.
    assert backend.threads and all(name in ("engine-scripted", "engine-scripted-audio") for name in backend.threads)
    assert engine.stats.completed == 1 and engine.stats.active == 0
    assert engine.stats.audio_seconds == pytest.approx(0.4)


def test_event_loop_keeps_running_while_the_backend_works():
    async def main():
        engine = Engine(ScriptedBackend(chunks=3, delay=0.1), max_concurrent=1, max_queue=0)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        stream = await engine.start(_request(), engine.admit())
        async for _ in stream:
            pass
        task.cancel()
        await engine.close()
        return ticks

    assert asyncio.run(main()) >= 15  # ~0.3 s of backend work, the loop ticked all along


def test_admission_limits_and_busy():
    async def main():
        gate = threading.Event()
        engine = Engine(ScriptedBackend(chunks=1, gate=gate), max_concurrent=2, max_queue=1, retry_after_s=7)
        admissions = [engine.admit() for _ in range(3)]  # 2 slots + 1 queue place
        with pytest.raises(EngineBusy) as busy:
            engine.admit()
        assert busy.value.retry_after_s == 7
        streams = [await engine.start(_request(), a) for a in admissions[:2]]
        third = asyncio.create_task(engine.start(_request(), admissions[2]))
        await asyncio.sleep(0.05)
        assert not third.done()  # waits for a slot
        snapshot = engine.snapshot()
        assert (snapshot["active"], snapshot["waiting"], snapshot["rejected"]) == (2, 1, 1)
        gate.set()
        for stream in [*streams, await third]:
            async for _ in stream:
                pass
        await _eventually(lambda: engine.stats.in_flight == 0)
        engine.admit().release()  # room again
        await engine.close()
        return engine.stats

    stats = asyncio.run(main())
    assert stats.completed == 3 and stats.rejected == 1 and stats.admitted == 4


def test_cancel_stops_generation_and_frees_the_slot():
    async def main():
        backend = ScriptedBackend(chunks=1000, delay=0.01)
        engine = Engine(backend, max_concurrent=1, max_queue=0)
        stream = await engine.start(_request(), engine.admit())
        await anext(stream)
        with pytest.raises(EngineBusy):
            engine.admit()
        stream.cancel()
        await _eventually(lambda: engine.stats.in_flight == 0)
        made = backend.chunks_made
        await asyncio.sleep(0.1)
        assert backend.chunks_made == made  # nothing generated after the stop
        with pytest.raises(Cancelled):
            async for _ in stream:
                pass
        admission = engine.admit()  # the slot is free again
        admission.release()
        await engine.close()
        return backend, engine.stats

    backend, stats = asyncio.run(main())
    assert backend.stopped.is_set()
    assert backend.chunks_made < 100
    assert stats.cancelled == 1 and stats.active == 0


def test_consumer_task_cancelled_while_waiting_for_a_chunk():
    """What the server sees when a client disconnects: the consuming task is cancelled mid-await."""

    async def main():
        gate = threading.Event()
        backend = ScriptedBackend(chunks=2, gate=gate)
        engine = Engine(backend, max_concurrent=1, max_queue=0)
        stream = await engine.start(_request(), engine.admit())

        async def consume():
            try:
                async for _ in stream:
                    pass
            finally:
                stream.cancel()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await _eventually(lambda: engine.stats.in_flight == 0)
        await engine.close()
        return backend, engine.stats

    backend, stats = asyncio.run(main())
    assert backend.chunks_made == 0 and stats.cancelled == 1


@pytest.mark.parametrize("text, error", [("bad", InputError), ("hello", RuntimeError)])
def test_backend_errors_reach_the_consumer_and_the_worker_survives(text, error):
    async def main():
        engine = Engine(ScriptedBackend(chunks=3, fail_after=1), max_concurrent=1, max_queue=0)
        stream = await engine.start(_request(text), engine.admit())
        received = []
        with pytest.raises(error):
            async for chunk in stream:
                received.append(chunk)
        await _eventually(lambda: engine.stats.in_flight == 0)
        # The single worker thread is still usable.
        engine.backend.fail_after = None
        after = [chunk async for chunk in await engine.start(_request(), engine.admit())]
        await engine.close()
        return received, after, engine.stats

    received, after, stats = asyncio.run(main())
    assert len(received) == (0 if text == "bad" else 1)
    assert len(after) == 3 and stats.failed == 1 and stats.completed == 1


def test_voice_cache_shares_and_reuses_preparations():
    async def main():
        backend = ScriptedBackend()
        engine = Engine(backend, max_concurrent=1, max_queue=0, voice_cache_size=2)
        audio = np.ones(10, dtype=np.float32)
        prepare = lambda: backend.prepare_voice(audio, 16000)  # noqa: E731
        first, second = await asyncio.gather(engine.voice("a", prepare), engine.voice("a", prepare))
        again = await engine.voice("a", prepare)
        assert first is second is again and backend.prepared == 1
        await engine.voice("b", prepare)
        await engine.voice("c", prepare)  # evicts "a", the least recently used
        await engine.voice("a", prepare)
        assert backend.prepared == 4
        # Failures propagate and are not cached.
        failing = lambda: backend.prepare_voice(np.zeros(0, dtype=np.float32), 16000)  # noqa: E731
        for _ in range(2):
            with pytest.raises(InputError):
                await engine.voice("bad", failing)
        await engine.close()
        return backend, engine.stats

    backend, stats = asyncio.run(main())
    assert backend.prepared == 6
    assert stats.voice_cache_hits == 2 and stats.voice_cache_misses == 6


def test_close_cancels_running_requests():
    async def main():
        backend = ScriptedBackend(chunks=10_000, delay=0.01)
        engine = Engine(backend, max_concurrent=1, max_queue=0)
        stream = await engine.start(_request(), engine.admit())
        await anext(stream)
        await asyncio.wait_for(engine.close(), timeout=5)
        return backend

    assert asyncio.run(main()).stopped.is_set()
