"""`cosyapp bench decode`: the Fish runner's batched decode steps and codec calls for several row counts,
against the fewest, on the tiny model through the CLI (the numbers are printed, not judged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_row_counts_are_timed_against_the_fewest(cli, tiny_fish_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    result = cli("bench", "decode", "--model-dir", str(tiny_fish_dir), "--device", "cpu", "--dtype", "float32",
                 "--rows", "2,1", "--steps", "2", "--json", str(out))
    report = json.loads(out.read_text())

    assert report["backend"] == "fish" and report["model"] == str(tiny_fish_dir) and report["steps"] == 2
    rows = report["rows"]
    assert list(rows) == ["1", "2"]
    one, two = rows["1"], rows["2"]
    assert one["frames_vs_fewest"] == 1.0 and one["codec_vs_fewest"] == 1.0
    assert one["frames_per_s"] == pytest.approx(1000.0 / one["step_ms"])
    assert two["frames_per_s"] == pytest.approx(2 * two["steps_per_s"])
    assert two["frames_vs_fewest"] == pytest.approx(two["frames_per_s"] / one["frames_per_s"])
    # 16 frames of 2048 samples at 44.1 kHz per row and call
    assert two["codec_audio_per_s"] == pytest.approx(2 * 16 * 2048 / 44100 / (two["codec_ms"] / 1000.0))
    assert "rows  step ms  steps/s  frames/s" in result.output
    assert f"{two['frames_vs_fewest']:.2f}x" in result.output


def test_row_counts_must_be_positive(cli) -> None:
    result = cli("bench", "decode", "--rows", "0,2", expect_ok=False)
    assert result.exit_code == 2 and "counts must be >= 1" in result.output
