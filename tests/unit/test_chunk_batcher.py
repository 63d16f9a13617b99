"""How a gathered chunk batch is cut into parts computed at the same time (token2wav._Batch)."""

from __future__ import annotations

import pytest

from cosyapp.backends.cosyvoice2.token2wav import _Batch


@pytest.mark.parametrize("streams,workers,parts", [
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (5, 2, [[0, 1], [2, 3, 4]]),
    (3, 4, [[0], [1], [2]]),
    (1, 1, [[0]]),
    (4, 1, [[0, 1, 2, 3]]),
])
def test_parts_cover_every_stream_once_leader_first(streams: int, workers: int, parts: list[list[int]]) -> None:
    batch = _Batch(streams=[object()] * streams, calls=[object()] * streams)  # type: ignore[list-item]
    batch.split(workers)
    assert batch.parts == parts
    assert batch.parts_left == len(parts)
    assert batch.gathered.is_set() and not batch.done.is_set()
