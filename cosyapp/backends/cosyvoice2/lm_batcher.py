"""Continuous batching of LM decoding across concurrent streams, on one thread.

Each stream's decoding is upstream's loop (`CosyVoice2LM.generate`: stop ids banned while the speech is
shorter than min_len, stop at a stop id or at max_len; `fixed_length` for benchmarks), held as a `Decoding`
that the batcher thread advances. Between steps, new decodings are prefilled into their KV-cache rows and
stopped ones leave; each step then decodes every running row in one forward, samples all of them at once
(`sample_rows`: each row with its own stream's sampler, exactly as alone, one host sync for all) and hands
each stream its token (`Decoding.take`).

A stream's thread takes its tokens once it holds what its next audio chunk needs (`Decoding.take`): it is
woken once per chunk, not once per token, and hands nothing to the batcher per step, so no step waits for a
stream. Whether a row decodes on while its stream computes a chunk is `LMBatcher.run_ahead`.

The decode batch is the contiguous row range 0..highest running row, so the cache is read through views and
not gathered. A row in that range that is not running (free, or being prefilled) gets a dummy input at the
position its next real step writes, so the dummy key/value is overwritten before anyone reads it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, StopRule, ban
from cosyapp.backends.cosyvoice2.sampling import RasSampler, sample_rows
from cosyapp.engine.stats import StageTimes

# How often a stream waiting for its tokens looks at its cancel event.
CANCEL_POLL_S = 0.05


@dataclass(eq=False)
class Decoding:
    """One stream's LM decoding, advanced by the batcher thread; its stream's thread takes the tokens."""
    row: int
    lm_input: torch.Tensor | None  # [1, L, hidden]: prefilled on the first step, then dropped
    rule: StopRule
    sampler: RasSampler
    stats: StageTimes | None = None
    on_token: Callable[[], None] | None = None  # called on the batcher thread for each token made
    prompt_len: int = field(init=False)  # L: the first token is fed back at position L
    produced: int = 0
    token: torch.Tensor | None = None  # [1] the last sampled id, on the device (next step's input)
    stop_requested: bool = False
    ended: threading.Event = field(default_factory=threading.Event)  # the batcher has let go of the row
    _tokens: list[int] = field(default_factory=list)  # made and not taken yet
    _wanted: float = 1  # how many the waiting taker needs before it is woken (inf: the end)
    _waiting: bool = False  # the taker is waiting
    _done: bool = False  # no more tokens will come
    _error: BaseException | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _wake_batcher: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.prompt_len = self.lm_input.shape[1]

    def take(self, at_least: int | None = 1, cancel: threading.Event | None = None) -> list[int] | None:
        """The tokens made and not taken yet, once there are `at_least` of them (None: all, at the end) or
        decoding has ended (then maybe fewer); None when it has ended and every token was taken. Raises the
        decoding's error. Waiting for as many as the next audio chunk needs wakes the caller once per chunk,
        not once per token. Returns early, with what there is (maybe nothing), once `cancel` is set."""
        with self._changed:
            self._wanted = math.inf if at_least is None else max(1, at_least)
            if not self._ready():
                self._waiting = True
                self._wake_batcher()
                while not self._changed.wait_for(self._ready, timeout=CANCEL_POLL_S):
                    if cancel is not None and cancel.is_set():
                        break
                self._waiting = False
            if self._error is not None:
                raise self._error
            tokens, self._tokens = self._tokens, []
            return None if self._done and not tokens else tokens

    def _ready(self) -> bool:
        return len(self._tokens) >= self._wanted or self._done

    def _put(self, token_id: int) -> None:
        with self._changed:
            self._tokens.append(token_id)
            if len(self._tokens) >= self._wanted:
                self._changed.notify()

    def _finish(self, error: BaseException | None = None) -> None:
        with self._changed:
            self._done = True
            self._error = self._error or error
            self._changed.notify()
        self.ended.set()


class LMBatcher:
    """Decodes every stream's LM rows in shared forwards on one thread (with a `static_step`, at its fixed
    batch sizes: CUDA graphs, decode_graphs.py).

    A row is decoded while its stream waits for tokens and has fewer than it waits for, or has fewer than
    `run_ahead` tokens it has not taken. On a GPU the LM's steps overlap the vocoder's kernels, so the LM
    decodes ahead while the stream vocodes. On a CPU (run_ahead 0) the LM and the vocoder compete for the
    same cores and interpreter lock: decoding ahead only slows the chunk being vocoded, so a stream's row
    waits while it vocodes.
    """

    def __init__(self, llm: CosyVoice2LM, max_rows: int, static_step: StaticDecodeStep | None = None,
                 threads: int | None = None, run_ahead: int = 0) -> None:
        self.llm = llm
        self.run_ahead = run_ahead
        self.threads = threads  # intra-op threads of the batcher's thread (None: torch's setting)
        self.max_rows = max_rows
        self.static_step = static_step
        self._cond = threading.Condition()
        self._joining: list[Decoding] = []
        self._running: dict[int, Decoding] = {}  # row -> decoding, touched by the batcher thread only
        self._next_position = [0] * max_rows
        self.batch_sizes: dict[int, int] = {}  # decode batch size -> number of forwards, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name="cosyvoice2-lm-batcher", daemon=True)
        self._thread.start()

    def start(self, row: int, lm_input: torch.Tensor, rule: StopRule, generator: torch.Generator | None,
              stats: StageTimes | None = None, on_token: Callable[[], None] | None = None) -> Decoding:
        """Decode from `lm_input` [1, L, hidden] in KV-cache row `row` (the caller's until `stop` returns)."""
        self.llm.ensure_cache(lm_input.shape[1] + rule.num_steps)
        decoding = Decoding(row, lm_input, rule, RasSampler.from_config(self.llm.config, generator), stats, on_token)
        decoding._wake_batcher = self._wake
        with self._cond:
            self._joining.append(decoding)
            self._cond.notify()
        return decoding

    def stop(self, decoding: Decoding) -> None:
        """Stop decoding (if it has not ended) and wait until the batcher no longer uses its row."""
        with self._cond:
            decoding.stop_requested = True
            self._cond.notify()
        decoding.ended.wait()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _wants_tokens(self, decoding: Decoding) -> bool:
        waited_for = decoding._wanted if decoding._waiting else 0
        return not decoding._done and len(decoding._tokens) < waited_for + self.run_ahead

    def _has_work(self) -> bool:
        return bool(self._joining) or any(d.stop_requested or self._wants_tokens(d) for d in self._running.values())

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work)
                joining, self._joining = self._joining, []
                stopped = [d for d in [*joining, *self._running.values()] if d.stop_requested]
            for decoding in stopped:
                decoding._finish()
            joining = [d for d in joining if not d.stop_requested]
            self._running = {d.row: d for d in [*self._running.values(), *joining] if not d.stop_requested}
            running = [d for d in self._running.values() if d not in joining and self._wants_tokens(d)]
            if not (joining or running):
                continue
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    got_token = self._step(joining, running)
            except BaseException as exc:
                # A failed forward may have half-written any row: every running decoding fails with it, and the
                # batcher goes on with new ones.
                for decoding in self._running.values():
                    decoding._finish(exc)
                self._running = {}
                continue
            elapsed = time.perf_counter() - start
            for decoding in got_token:
                if decoding.stats is not None:
                    decoding.stats.add("lm_token", elapsed)
            for decoding in list(self._running.values()):
                if decoding.ended.is_set():
                    del self._running[decoding.row]

    def _step(self, joining: list[Decoding], running: list[Decoding]) -> list[Decoding]:
        """One token for every decoding (joining ones prefilled, one forward per run of consecutive rows; running
        ones decoded in one forward) -> the decodings that got one (the others stopped)."""
        joining = sorted(joining, key=lambda d: d.row)
        logp: list[torch.Tensor] = []
        for run in consecutive_rows(joining):
            logp.extend(self.llm.prefill_logp([d.lm_input for d in run], run[0].row).unbind(0))
        for decoding in joining:
            decoding.lm_input = None  # the prompt is in the cache now
            self._next_position[decoding.row] = decoding.prompt_len
        if running:
            logp.extend(self._decode(running).unbind(0))
        decodings = joining + running
        scores = torch.stack([ban(row_logp, d.rule.banned(d.produced)) for row_logp, d in zip(logp, decodings)])
        got_token = []
        for decoding, sample in zip(decodings, sample_rows([d.sampler for d in decodings], scores)):
            if decoding.rule.is_stop(sample.token_id):
                decoding._finish()
                continue
            got_token.append(decoding)
            decoding.produced += 1
            decoding.token = sample.token
            decoding._put(sample.token_id)
            if decoding.on_token is not None:
                decoding.on_token()
            if decoding.produced == decoding.rule.num_steps:
                decoding._finish()
        return got_token

    def _decode(self, running: list[Decoding]) -> torch.Tensor:
        """Log-probs [len(running), V] after feeding each running row its last token."""
        rows = max(d.row for d in running) + 1
        fixed_rows = self.static_step.size_for(rows) if self.static_step is not None else None
        rows = fixed_rows or rows
        index = torch.tensor([d.row for d in running], device=self.llm.device)
        embedded = self.llm.speech_embedding(torch.cat([d.token for d in running]))
        x = embedded.new_zeros(rows, 1, embedded.shape[-1])
        x[index, 0] = embedded
        positions = list(self._next_position[:rows])
        for decoding in running:
            positions[decoding.row] = decoding.prompt_len + decoding.produced - 1
            self._next_position[decoding.row] = positions[decoding.row] + 1
        input_pos = torch.tensor(positions, device=self.llm.device).view(rows, 1)
        if fixed_rows is not None:
            decoded = self.static_step(x, input_pos)
        else:
            decoded = self.llm.speech_logp(self.llm(x, input_pos, 0, max(positions) + 1)[:, -1])
        self.batch_sizes[len(running)] = self.batch_sizes.get(len(running), 0) + 1
        return decoded[index]


def consecutive_rows(decodings: list[Decoding]) -> list[list[Decoding]]:
    """Decodings sorted by row -> runs of them in consecutive cache rows (one prefill forward each)."""
    runs: list[list[Decoding]] = []
    for decoding in decodings:
        if runs and runs[-1][-1].row + 1 == decoding.row:
            runs[-1].append(decoding)
        else:
            runs.append([decoding])
    return runs
