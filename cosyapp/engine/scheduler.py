"""The engine's policy: admission, the KV-row pool, and what each step of a backend's core loop runs.

Pure policy: no model math and no torch. The core loop (core.py) asks `Scheduler.plan` once per step and calls
the backend's model runner with what it answers; the runner's per-stream states say where each stream is
(`StreamState`), the scheduler decides what to do about it.

- Admission: `AdmissionLimit` holds at most `max_concurrent` synthesizing requests and `max_queue` waiting
  ones; beyond that a request is refused at once with `EngineBusy` (503 + Retry-After), never queued without
  bound. A stream that reaches the core takes a row of the `RowPool` (the runner's KV-cache rows, one pool
  type for every backend) and keeps it until it ends, fails or is cancelled.
- Each step: every stream that starts a sentence is prefilled; every stream that is decoding and still short
  of the tokens of its next audio chunk (plus `run_ahead` tokens, where decoding ahead overlaps the audio work,
  on a GPU) decodes one token, all of them in one batched forward; then one audio group is computed.
- Audio groups: streams whose next chunk is ready, grouped by the runner's shape key (equal keys: equal
  shapes and cache states, so one batched call computes them all, each as it would be alone). One group is in
  the works at a time (the core computes it beside the next LM steps); its streams go on decoding meanwhile
  but get no other audio group until it is back.
- First-chunk priority: the group of the most urgent stream goes first. A stream with no audio yet is the
  most urgent (its listener hears nothing), oldest first; a stream with audio is as urgent as the moment its
  listener runs dry (first audio time + audio seconds sent: earliest deadline first). While some stream is
  still decoding towards its first chunk, a chunk whose listener has more than `slack_s` of audio buffered
  waits, so the decode steps that stand between the newcomer and its first audio are not held up by audio
  nobody needs yet. The slack follows the audio steps' measured cost, so a buffered stream is served before
  it can run dry.
- Cancellation: a cancelled stream leaves at the next step (`Scheduler.remove`) and its row is free at once.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Hashable, Protocol


class EngineBusy(Exception):
    """Every stream slot and queue place is taken; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"server busy: all synthesis slots and queue places are taken; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class AdmissionLimit:
    """Counts requests holding a slot or a queue place (`in_flight`) against `max_concurrent + max_queue`."""

    def __init__(self, max_concurrent: int, max_queue: int, retry_after_s: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def take(self) -> None:
        """One more place, or EngineBusy when all are taken."""
        if self.in_flight >= self.max_concurrent + self.max_queue:
            raise EngineBusy(self.retry_after_s)
        self.in_flight += 1

    def give_back(self) -> None:
        self.in_flight -= 1


class Admission:
    """A request's place in the engine, held from `admit()` until its work is over. The caller releases it if
    it fails before starting; after that the stream owns it. Idempotent."""

    def __init__(self, limit: AdmissionLimit) -> None:
        self._limit = limit
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limit.give_back()


class RowPool:
    """The runner's KV-cache rows; the lowest free row first, so batched decodes over rows 0..highest in use
    stay as small as the number of streams."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._free = list(range(rows))

    def take(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def give_back(self, row: int) -> None:
        heapq.heappush(self._free, row)

    @property
    def free(self) -> int:
        return len(self._free)


class StreamState(Protocol):
    """What the scheduler reads of a runner's per-stream state (the runner keeps it true after each call)."""

    needs_prefill: bool  # a sentence starts: its prompt goes into the stream's row next
    decoding: bool  # the LM is still making tokens for the current sentence
    tokens_short: int  # tokens missing before the next audio chunk can be computed (<= 0: it can)
    audio_pending: bool  # audio is left to compute once decoding has ended (the sentence's last chunk)
    finished: bool  # every chunk of the request has been made
    audio_key: Hashable | None  # streams with equal keys compute their chunks in one batched call; None: alone


@dataclass(eq=False)
class Ticket:
    """The scheduler's record of one stream in the core."""
    state: StreamState
    arrival: float  # when it reached the core (seconds, the core's clock)
    row: int | None = None
    streaming: bool = True  # False: one waveform at the end, nobody listens before
    first_audio_at: float | None = None
    audio_s: float = 0.0  # audio seconds handed out so far
    audio_busy: bool = False  # its chunk is being computed: the runner's audio state is not to be touched

    def audio_ready(self) -> bool:
        state = self.state
        if self.audio_busy or state.needs_prefill or state.finished:
            return False
        return state.tokens_short <= 0 or (not state.decoding and state.audio_pending)

    def deadline(self) -> float:
        """When its listener runs out of audio (no audio yet: the arrival, so older newcomers go first)."""
        if self.first_audio_at is None or not self.streaming:
            return self.arrival
        return self.first_audio_at + self.audio_s

    def priority(self) -> tuple[bool, float]:
        return (self.first_audio_at is not None and self.streaming, self.deadline())


@dataclass
class StepPlan:
    prefill: list[Ticket] = field(default_factory=list)
    decode: list[Ticket] = field(default_factory=list)
    audio: list[Ticket] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.audio)


# Smallest audio buffer a stream keeps before its chunk goes ahead of a newcomer's first chunk, and how many times
# the slowest recent audio step a buffer must cover (the chunk still has to be computed when it is served).
MIN_SLACK_S = 0.5
SLACK_STEPS = 3.0
AUDIO_STEP_MEMORY = 8  # recent audio step times kept


class Scheduler:
    """Rows and per-step plans for one backend's core loop (module docstring)."""

    def __init__(self, rows: int, run_ahead: int = 0) -> None:
        self.pool = RowPool(rows)
        self.run_ahead = run_ahead
        self.waiting: list[Ticket] = []  # reached the core, no row free yet
        self.running: list[Ticket] = []
        self._audio_step_s: list[float] = []

    def add(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)
        self._seat()

    def remove(self, ticket: Ticket) -> None:
        """The stream ended, failed or was cancelled: it leaves now and its row is free for the next step."""
        if ticket in self.waiting:
            self.waiting.remove(ticket)
            return
        if ticket in self.running:
            self.running.remove(ticket)
            if ticket.row is not None:
                self.pool.give_back(ticket.row)
                ticket.row = None
            self._seat()

    def _seat(self) -> None:
        while self.waiting and self.pool.free:
            ticket = self.waiting.pop(0)
            ticket.row = self.pool.take()
            self.running.append(ticket)

    @property
    def slack_s(self) -> float:
        return max(MIN_SLACK_S, SLACK_STEPS * max(self._audio_step_s, default=0.0))

    def observe_audio_step(self, seconds: float) -> None:
        """The measured cost of an audio step, so the slack covers what serving a chunk takes."""
        self._audio_step_s.append(seconds)
        del self._audio_step_s[:-AUDIO_STEP_MEMORY]

    def plan(self, now: float, audio_free: bool = True, lm_free: bool = True) -> StepPlan:
        """This step's work; `audio_free` False: no audio group is planned (the core computes as many as it can
        already); `lm_free` False: no LM work (a first chunk is being computed with the whole machine)."""
        plan = StepPlan()
        for ticket in self.running:
            state = ticket.state
            if state.finished:
                continue
            if not lm_free:
                continue
            if state.needs_prefill:
                plan.prefill.append(ticket)
            elif state.decoding and state.tokens_short > -self.run_ahead:
                plan.decode.append(ticket)
        if audio_free:
            plan.audio = self.audio_group(now, starving=any(self._starving(t) for t in plan.prefill + plan.decode))
        return plan

    def first_chunk(self, group: list[Ticket]) -> bool:
        """Whether the group holds a first chunk a listener waits for: it is computed with the whole machine and
        the LM waits for it (on a CPU both compete for the same cores, and this chunk is what someone hears
        first)."""
        return any(self._starving(t) for t in group)

    def _starving(self, ticket: Ticket) -> bool:
        """Working towards its first chunk, which a listener waits for."""
        return ticket.streaming and ticket.first_audio_at is None

    def audio_group(self, now: float, starving: bool = False) -> list[Ticket]:
        """The most urgent ready stream and every ready stream with its shape key (module docstring); nothing when
        newcomers are starving and the most urgent ready stream has more than `slack_s` of audio buffered."""
        ready = sorted((t for t in self.running if t.audio_ready()), key=Ticket.priority)
        if not ready:
            return []
        first = ready[0]
        buffered = first.deadline() - now
        if starving and first.priority()[0] and buffered > self.slack_s:
            return []
        key = first.state.audio_key
        if key is None:
            return [first]
        return [first, *(t for t in ready[1:] if t.state.audio_key == key)]
