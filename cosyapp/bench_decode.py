"""Decode benchmark of the Fish model runner: batched decode steps and batched codec calls for 1, 2, 4 ... rows.

Every row is a fixed-length stream (the stop token ignored, so random weights run as long as asked) on its own
KV-cache row, all prefilled together and then decoded in step: one `decode_step` is one slow-transformer step
for every row plus the fast transformer over the codebooks for every row. The codec part decodes the next 16
frames of every row in one call (median of 3), as streams whose chunks fall due together are decoded. Per row count it
reports the median step time, steps per second, frames per second over all rows, and that against one row:
what batching gains. Used by `cosyapp bench decode`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from cosyapp.backends.fish.backend import FishBackend
from cosyapp.backends.fish.serving import STREAM_FIRST_FRAMES, STREAM_FRAMES
from cosyapp.bench import BENCH_TEXT, machine_description
from cosyapp.engine.registry import load_backend, make_tiny
from cosyapp.engine.types import SynthesisRequest

WARM_UP_STEPS = 2
CODEC_REPEATS = 3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Any, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def fish_decode_times(backend: FishBackend, rows: int, steps: int) -> dict[str, Any]:
    """Median decode-step and codec times of `rows` streams in step (see the module docstring)."""
    runner = backend.runner
    codec_frames = STREAM_FIRST_FRAMES + CODEC_REPEATS * STREAM_FRAMES
    frames = WARM_UP_STEPS + max(steps, codec_frames)
    states = [backend.start_stream(SynthesisRequest(text=BENCH_TEXT, voice=backend.no_reference_voice(), seed=row,
                                                    fixed_length=frames + 1), row) for row in range(rows)]
    try:
        runner.prefill(states)
        for _ in range(WARM_UP_STEPS):
            runner.decode_step(states)
        step_s = statistics.median(_timed(lambda: runner.decode_step(states), backend.device) for _ in range(steps))
        while states[0].decodable < codec_frames:
            runner.decode_step(states)
        runner.codec_decode([(state, STREAM_FIRST_FRAMES) for state in states])  # the first chunk, untimed
        codec_s = statistics.median(
            _timed(lambda: runner.codec_decode([(state, STREAM_FRAMES) for state in states]), backend.device)
            for _ in range(CODEC_REPEATS))
    finally:
        for state in states:
            runner.release(state)
    audio_s = STREAM_FRAMES * backend.codec.cfg.frame_length / backend.info().sample_rate
    return {"step_ms": 1000.0 * step_s, "steps_per_s": 1.0 / step_s, "frames_per_s": rows / step_s,
            "codec_ms": 1000.0 * codec_s, "codec_audio_per_s": rows * audio_s / codec_s}


def run_decode_bench(model_dir: Path | None, size: str = "tiny", device: str = "auto", dtype: str = "auto",
                     row_counts: Sequence[int] = (1, 2, 4), steps: int = 20) -> dict[str, Any]:
    """Load (or make) a Fish model with as many KV-cache rows as the largest count, then time each count."""
    counts = sorted(set(row_counts))
    with tempfile.TemporaryDirectory(prefix="cosyapp-bench-") as scratch:
        if model_dir is None:
            model_dir = Path(scratch) / "fish"
            make_tiny("fish", model_dir, size=size)
            label = f"random {size} fish model"
        else:
            label = str(model_dir)
        backend = load_backend("fish", model_dir, device=device, dtype=dtype, max_streams=max(counts))
        results = {count: fish_decode_times(backend, count, steps) for count in counts}
    base = results[counts[0]]
    for count, result in results.items():
        result["frames_vs_fewest"] = result["frames_per_s"] / base["frames_per_s"]
        result["codec_vs_fewest"] = result["codec_audio_per_s"] / base["codec_audio_per_s"]
    return {"backend": "fish", "model": label, "machine": machine_description(), "device": str(backend.device),
            "steps": steps, "codec_frames": STREAM_FRAMES, "rows": results}


def format_decode_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['backend']} decode, {report['model']} on {report['device']} ({report['machine']}); median of "
        f"{report['steps']} steps; codec: {report['codec_frames']} frames per row in one call, median of "
        f"{CODEC_REPEATS}",
        "  rows  step ms  steps/s  frames/s  frames/s vs fewest  codec ms  audio s/s  audio/s vs fewest",
    ]
    for count, row in report["rows"].items():
        lines.append(f"  {count:4d}  {row['step_ms']:7.1f}  {row['steps_per_s']:7.1f}  {row['frames_per_s']:8.1f}  "
                     f"{row['frames_vs_fewest']:17.2f}x  {row['codec_ms']:8.1f}  {row['codec_audio_per_s']:9.2f}  "
                     f"{row['codec_vs_fewest']:16.2f}x")
    return "\n".join(lines)
