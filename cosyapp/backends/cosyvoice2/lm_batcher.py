"""Continuous batching of LM decode steps across concurrent streams.

Every stream keeps its own decoding loop (`CosyVoice2LM.generate`), its own sampler (generator, repetition
window, pre-drawn noise) and its own KV-cache row. Streams hand their step to the batcher thread, which runs
one forward for every waiting stream and samples all of their rows at once (`sample_rows`: each row with
its own stream's sampler, exactly as alone, one host sync for all), then hands each stream its token.
Streams join (prefill into their row) and leave between steps.

The decode batch is the contiguous row range 0..highest waiting row, so the cache is read through views
and not gathered. A row in that range that is not waiting (its stream is busy vocoding, or the row is
free) gets a dummy input at the position its next real step writes, so the dummy key/value is
overwritten before anyone reads it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, ban
from cosyapp.backends.cosyvoice2.sampling import RasSampler, SampleResult, sample_rows

# How long the batcher waits for streams that were in the last batch before running without them. Streams
# in step submit within a few milliseconds of each other (each takes its token, pushes it through its chunk
# schedule and embeds it on its own thread, under the GIL); a stream that misses a step stays a step behind,
# and out of its neighbours' chunk batches, so the window covers that spread. One that went off to vocode a chunk misses a batch or two and rejoins
# when it submits again, without holding the others up.
GATHER_WINDOW_S = 0.005


@dataclass
class _Step:
    x: torch.Tensor  # [1, T, hidden]
    position: int
    sampler: RasSampler
    banned: tuple[int, int | None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: SampleResult | None = None
    error: BaseException | None = None


class LMBatcher:
    """An `LMStepRunner` that decodes all waiting rows of `llm`'s KV cache in one forward (with a
    `static_step`, at its fixed batch sizes: CUDA graphs, decode_graphs.py) and samples them all at once,
    each with its own stream's sampler."""

    def __init__(self, llm: CosyVoice2LM, max_rows: int, static_step: StaticDecodeStep | None = None,
                 threads: int | None = None) -> None:
        self.llm = llm
        self.threads = threads  # intra-op threads of the batcher's thread (None: torch's setting)
        self.max_rows = max_rows
        self.static_step = static_step
        self._cond = threading.Condition()
        self._pending: dict[int, _Step] = {}
        self._active: set[int] = set()
        self._expected: set[int] = set()  # rows of the last batch that are still open
        self._next_position = [0] * max_rows
        self.batch_sizes: dict[int, int] = {}  # decode batch size -> number of forwards, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name="cosyvoice2-lm-batcher", daemon=True)
        self._thread.start()

    def open(self, row: int) -> None:
        """A stream starts using `row`."""
        with self._cond:
            self._active.add(row)

    def close(self, row: int) -> None:
        """The stream using `row` is done: the batcher stops waiting for it."""
        with self._cond:
            self._active.discard(row)
            self._expected.discard(row)
            self._cond.notify()

    def __call__(self, x: torch.Tensor, position: int, cache_row: int, sampler: RasSampler,
                 banned: tuple[int, int | None] | None) -> SampleResult:
        step = _Step(x, position, sampler, banned)
        with self._cond:
            self._pending[cache_row] = step
            self._cond.notify()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.result

    def _take_batch(self) -> dict[int, _Step]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            deadline = time.monotonic() + GATHER_WINDOW_S
            while not self._expected <= self._pending.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending, {}
            self._expected = set(batch) & self._active
            return batch

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            batch = self._take_batch()
            try:
                with torch.inference_mode():
                    self._forward(batch)
            except BaseException as exc:  # hand the failure to every waiting stream, keep serving
                for step in batch.values():
                    step.error = exc
            for step in batch.values():
                step.done.set()

    def _forward(self, batch: dict[int, _Step]) -> None:
        logp = self._logp(batch)
        steps = list(batch.values())
        scores = torch.stack([ban(logp[row], step.banned) for row, step in batch.items()])
        for step, result in zip(steps, sample_rows([step.sampler for step in steps], scores)):
            step.result = result

    def _logp(self, batch: dict[int, _Step]) -> dict[int, torch.Tensor]:
        """Log-probs [V] after each row's step: prefills one by one, decodes in one forward."""
        logp: dict[int, torch.Tensor] = {}
        decodes = {row: step for row, step in batch.items() if step.x.shape[1] == 1}
        for row, step in batch.items():
            if row not in decodes:  # prefills have their own lengths: one forward each
                logp[row] = self.llm.step_logp(step.x, step.position, row)
                self._next_position[row] = step.position + step.x.shape[1]
        if not decodes:
            return logp
        rows = max(decodes) + 1
        fixed_rows = self.static_step.size_for(rows) if self.static_step is not None else None
        rows = fixed_rows or rows
        hidden_size = next(iter(decodes.values())).x.shape[-1]
        x = torch.zeros(rows, 1, hidden_size, dtype=next(iter(decodes.values())).x.dtype, device=self.llm.device)
        positions = list(self._next_position[:rows])
        for row, step in decodes.items():
            x[row] = step.x[0]
            positions[row] = step.position
        input_pos = torch.tensor(positions, device=self.llm.device).view(rows, 1)
        if fixed_rows is not None:
            decoded = self.static_step(x, input_pos)
        else:
            decoded = self.llm.speech_logp(self.llm(x, input_pos, 0, max(positions) + 1)[:, -1])
        for row, step in decodes.items():
            logp[row] = decoded[row]
            self._next_position[row] = step.position + 1
        self.batch_sizes[len(decodes)] = self.batch_sizes.get(len(decodes), 0) + 1
        return logp
