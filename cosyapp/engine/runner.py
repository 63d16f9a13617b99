"""What a backend's model runner offers the core loop, and the runner of a backend that has none of its own.

A backend hands the core its `stream_runner` (CosyVoice: the model runner itself; Fish: serving.py's schedule
over the Fish model runner).

A model runner is pure math over per-stream states (scheduler.StreamState plus whatever the runner keeps in
them: KV row, sampler and generator, flow, vocoder or codec caches). The core owns the states and passes them
in; every call is batched over the states it is given and keeps no request bookkeeping of its own. A call
that cannot serve one of its states (bad input found late, a too-long sentence) sets that state's `error`
and goes on with the others; an exception out of a call fails every state of that call.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from cosyapp.engine.sizing import CoreThreads
from cosyapp.engine.types import SynthesisRequest


class ModelRunner(Protocol):
    rows: int  # KV-cache rows: streams the runner can hold at once
    run_ahead: int  # tokens a stream may decode past its next chunk's (0 on a CPU: the LM would slow the audio)
    threads: CoreThreads  # how the core uses the cores for this runner (sizing.py `core_threads`)

    def open(self, request: SynthesisRequest, row: int) -> Any:
        """A new stream's state in cache row `row` (frontend work; InputError for bad input)."""
        ...

    def prefill(self, states: Sequence[Any]) -> None:
        """Put each state's next sentence prompt into its row and sample its first token."""
        ...

    def decode(self, states: Sequence[Any]) -> None:
        """One token for every state, in one batched forward."""
        ...

    def prepare_audio(self, states: Sequence[Any]) -> Any:
        """The first part of each state's next audio chunk, on the core's thread: take the tokens or codes the
        chunk needs from the state and move its schedule on -> the work `compute_audio` does."""
        ...

    def compute_audio(self, work: Any) -> Any:
        """The batched flow and vocoder (or codec) math of `prepare_audio`'s work, states of one shape key in
        one call. The core may run it on its audio thread while `prefill` and `decode` run, for these states
        too: it touches only the audio caches of its states, which nothing else touches meanwhile."""
        ...

    def finish_audio(self, states: Sequence[Any], computed: Any) -> list[list[np.ndarray]]:
        """Back on the core's thread: each state's chunks (float32 mono) out of `compute_audio`'s result, and
        the states moved on (a sentence or the stream over)."""
        ...

    def close(self, state: Any) -> None:
        """The stream is over (ended, failed or cancelled): release what the state holds."""
        ...


class GeneratorState:
    """A stream of a backend without a runner: its `synthesize` generator, advanced one chunk per step."""

    needs_prefill = False
    decoding = False
    tokens_short = 0
    audio_key = None

    def __init__(self, chunks: Iterator[np.ndarray]) -> None:
        self.chunks = chunks
        self.audio_pending = True
        self.finished = False
        self.error: BaseException | None = None


class GeneratorRunner:
    """Drives `backend.synthesize(request)` through the core, one stream's next chunk per audio step (no
    batching across streams; the backend keeps its own cache rows)."""

    run_ahead = 0
    threads = CoreThreads(audio_workers=1, parallel_kernels=True)

    def __init__(self, backend: Any, rows: int) -> None:
        self.backend = backend
        self.rows = rows

    def open(self, request: SynthesisRequest, row: int) -> GeneratorState:
        return GeneratorState(iter(self.backend.synthesize(request)))

    def prefill(self, states: Sequence[GeneratorState]) -> None:
        pass

    def decode(self, states: Sequence[GeneratorState]) -> None:
        pass

    def prepare_audio(self, states: Sequence[GeneratorState]) -> list[GeneratorState]:
        return list(states)

    def compute_audio(self, states: list[GeneratorState]) -> list[np.ndarray | None]:
        return [next(state.chunks, None) for state in states]

    def finish_audio(self, states: Sequence[GeneratorState], chunks: list[np.ndarray | None]) -> list[list[np.ndarray]]:
        out = []
        for state, chunk in zip(states, chunks):
            if chunk is None:
                state.finished = True
                state.audio_pending = False
                out.append([])
            else:
                out.append([chunk])
        return out

    def close(self, state: GeneratorState) -> None:
        close = getattr(state.chunks, "close", None)
        if close is not None:
            close()
