"""The scheduler's policy on plain stand-in states (no model): rows, step plans, audio groups, first-chunk
priority, removal."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from cosyapp.engine import scheduler as scheduler_module
from cosyapp.engine.scheduler import AdmissionLimit, EngineBusy, Scheduler, Ticket


@dataclass
class State:
    needs_prefill: bool = False
    decoding: bool = True
    tokens_short: int = 5
    audio_pending: bool = True
    finished: bool = False
    audio_key: object = None


def seat(scheduler: Scheduler, state: State, arrival: float = 0.0, streaming: bool = True) -> Ticket:
    ticket = Ticket(state, arrival, streaming=streaming)
    scheduler.add(ticket)
    return ticket


def test_the_scheduler_module_imports_no_torch() -> None:
    tree = ast.parse(Path(scheduler_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] in ("torch", "numpy") for name in imported)


def test_rows_lowest_first_waiting_without_a_row_and_freed_on_removal() -> None:
    scheduler = Scheduler(rows=2)
    a, b, c = (seat(scheduler, State()) for _ in range(3))
    assert (a.row, b.row, c.row) == (0, 1, None) and scheduler.waiting == [c]
    scheduler.remove(a)
    assert c.row == 0 and scheduler.pool.free == 0  # the freed row goes to the waiting stream at once
    scheduler.remove(b)
    scheduler.remove(c)
    assert scheduler.pool.free == 2


def test_plan_prefills_decodes_the_short_and_groups_ready_audio_by_key() -> None:
    scheduler = Scheduler(rows=6)
    new = seat(scheduler, State(needs_prefill=True))
    short = seat(scheduler, State(tokens_short=3))
    ready_a = seat(scheduler, State(tokens_short=0, audio_key="k"), arrival=1.0)
    ready_b = seat(scheduler, State(tokens_short=-3, audio_key="k"), arrival=2.0)
    other_key = seat(scheduler, State(tokens_short=0, audio_key="other"), arrival=3.0)
    ended = seat(scheduler, State(decoding=False, tokens_short=9), arrival=5.0)  # its last chunk is due
    plan = scheduler.plan(now=10.0)
    assert plan.prefill == [new]
    assert plan.decode == [short]  # the ready ones wait while their chunk is computed (run_ahead 0)
    assert plan.audio == [ready_a, ready_b]  # the oldest ready stream's key; the other key waits
    assert other_key not in plan.audio and ended not in plan.audio
    scheduler.run_ahead = 3
    assert ready_a in scheduler.plan(now=10.0).decode and ready_b not in scheduler.plan(now=10.0).decode


def test_first_chunks_go_before_buffered_audio_and_buffered_audio_waits_for_newcomers() -> None:
    scheduler = Scheduler(rows=3)
    playing = seat(scheduler, State(tokens_short=0), arrival=0.0)
    playing.first_audio_at, playing.audio_s = 1.0, 5.0  # its listener has audio until t = 6
    newcomer = seat(scheduler, State(tokens_short=0), arrival=4.0)
    assert scheduler.plan(now=2.0).audio == [newcomer]  # no audio yet beats audio buffered
    newcomer.state.tokens_short = 4  # now decoding towards its first chunk
    assert scheduler.plan(now=2.0).audio == []  # 4 s buffered > slack: the newcomer's decode steps go first
    assert scheduler.plan(now=5.8).audio == [playing]  # about to run dry: served anyway
    scheduler.observe_audio_step(2.0)  # audio steps got slow: the slack grows to cover them
    assert scheduler.plan(now=2.0).audio == [playing]


def test_earliest_deadline_first_among_streams_with_audio() -> None:
    scheduler = Scheduler(rows=2)
    long_buffer = seat(scheduler, State(tokens_short=0, decoding=False), arrival=0.0)
    long_buffer.first_audio_at, long_buffer.audio_s = 0.0, 9.0
    short_buffer = seat(scheduler, State(tokens_short=0, decoding=False), arrival=1.0)
    short_buffer.first_audio_at, short_buffer.audio_s = 1.0, 2.0
    assert scheduler.plan(now=2.0).audio == [short_buffer]


def test_admission_limit() -> None:
    limit = AdmissionLimit(max_concurrent=1, max_queue=1, retry_after_s=3)
    limit.take()
    limit.take()
    with pytest.raises(EngineBusy):
        limit.take()
    limit.give_back()
    limit.take()
