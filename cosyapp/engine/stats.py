"""Per-request stage timing for benchmarks (`cosyapp bench`, scripts/bench_engine.py) and the service's metrics.

Timing is off unless a request carries a `StageTimes`. Benchmarks synchronise CUDA work at stage boundaries so
the numbers are wall time of that stage; the service does not (`synchronize=False`: a sync per stage would slow
every stream), so on a GPU its numbers are the host's time per stage, the device's queue showing up wherever
the host waits for results.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Sequence

import torch


class StageTimes:
    def __init__(self, synchronize: bool = True) -> None:
        self.synchronize = synchronize
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """`with stats.stage("flow"):` adds the block's wall time under `name`."""
        return timed_each([self], name)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name].append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"count": len(v), "total_s": sum(v), "mean_ms": 1000.0 * sum(v) / len(v), "max_ms": 1000.0 * max(v)}
            for name, v in self.seconds.items() if v
        }


def timed(stats: StageTimes | None, name: str) -> contextlib.AbstractContextManager[None]:
    """`with timed(request.stats, "flow"):` times the block when stats are on and costs nothing otherwise."""
    return timed_each([stats], name)


@contextlib.contextmanager
def timed_each(stats: Sequence[StageTimes | None], name: str) -> Iterator[None]:
    """`timed` for work done for several requests at once (a batch): each request with stats on gets the
    block's wall time."""
    on = [s for s in stats if s is not None]
    if not on:
        yield
        return
    synchronize = torch.cuda.is_available() and any(s.synchronize for s in on)
    if synchronize:
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if synchronize:
            torch.cuda.synchronize()
        for s in on:
            s.add(name, time.perf_counter() - start)
