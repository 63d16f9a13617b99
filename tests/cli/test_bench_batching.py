"""`cosyapp bench engine --batch-streams`: the vocoding of several streams at once, through the chunk batcher,
against one stream (what batching gains in audio per second), on the tiny model through the CLI."""

from __future__ import annotations

import json
from pathlib import Path


def test_streams_vocoded_at_once_are_timed_against_one(cli, tiny_cosyvoice2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", "engine", "--model-dir", str(tiny_cosyvoice2_dir), "--device", "cpu", "--runs", "1",
                 "--tokens", "40", "--batch-streams", "4,1", "--json", str(out))
    batching = json.loads(out.read_text())["chunk_batching"]

    assert batching["tokens"] == 40
    rows = batching["streams"]
    assert list(rows) == ["1", "4"]
    one, four = rows["1"], rows["4"]
    assert one["speed_up"] == 1.0 and one["per_stream_ms"] == one["wall_ms"] > 0
    assert four["per_stream_ms"] == four["wall_ms"] / 4
    assert four["speed_up"] == 4 * one["wall_ms"] / four["wall_ms"]
    # Every call of every stream ran in some batch, and the four streams' calls shared batches.
    calls_per_stream = sum(int(size) * count for size, count in one["batches"].items())
    assert one["batches"] == {"1": calls_per_stream}
    assert sum(int(size) * count for size, count in four["batches"].items()) == 4 * calls_per_stream
    assert max(int(size) for size in four["batches"]) > 1
    assert "vocoding of 40 LM tokens per stream, all streams in step" in result.output
    assert f"{four['speed_up']:.2f}x" in result.output


def test_stream_counts_must_be_positive(cli) -> None:
    result = cli("bench", "engine", "--batch-streams", "2,0", expect_ok=False)
    assert result.exit_code == 2 and "counts must be >= 1" in result.output


def test_batch_streams_is_a_cosyvoice2_option(cli) -> None:
    result = cli("bench", "engine", "--backend", "fish", "--batch-streams", "1,2", expect_ok=False)
    assert result.exit_code == 2 and "only the cosyvoice2 backend" in result.output
