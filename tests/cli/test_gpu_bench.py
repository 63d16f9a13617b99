"""scripts/gpu_bench.sh dry-run on the CPU: the same script the GPU machine runs, with tiny models and one
request per level, a baseline checkout (this one) benchmarked before this one at each step, and the summary
it writes. Plus the device check's pass/fail rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from cosyapp.device_check import StageCheck, rel_error

REPO_ROOT = Path(__file__).resolve().parents[2]
DRY_RUN = {
    "PYTHON": sys.executable,
    "GPU_BENCH_WHEELS": "/nonexistent",  # the test's interpreter has every package
    "GPU_BENCH_DEVICE": "cpu",
    "GPU_BENCH_SIZE": "tiny",
    "GPU_BENCH_LEVELS": "1,2",
    "GPU_BENCH_FISH_LEVELS": "1",
    "GPU_BENCH_REQUESTS": "1",
    "GPU_BENCH_TOKENS": "30",
    "GPU_BENCH_FISH_FRAMES": "20",
    "GPU_BENCH_BATCH_STREAMS": "1,2",
    "GPU_BENCH_RUNS": "1",
    "GPU_BENCH_STEP_TIMEOUT": "240",
}


@pytest.mark.timeout(900)
def test_cpu_dry_run_runs_every_step_and_writes_the_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COSYAPP_", "GPU_BENCH_"))}
    env.update(DRY_RUN, GPU_BENCH_BASELINE=str(REPO_ROOT), TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    run = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_bench.sh"), str(out)], env=env, capture_output=True,
                         text=True, timeout=880)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all steps passed" in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    steps = list(summary["steps"])
    # Each benchmark step ran on the baseline first, then on this checkout.
    assert steps.index("engine_baseline") + 1 == steps.index("engine_current")
    assert steps.index("service_fixed_baseline") + 1 == steps.index("service_fixed_current")
    assert all(step["rc"] == 0 for step in summary["steps"].values())

    check = summary["device_check"]
    assert check["passed"] and check["device"] == "cpu"
    stages = {(row["backend"], row["stage"]) for row in check["checks"]}
    assert {backend for backend, _ in stages} == {"cosyvoice2", "fish"} and len(stages) >= 6

    levels = {(row["backend"], row["checkout"], row["texts"], row["concurrency"]): row for row in summary["levels"]}
    expected = {("cosyvoice2", label, "fixed", c) for label in ("baseline", "current") for c in (1, 2)}
    expected |= {("cosyvoice2", "current", "natural", c) for c in (1, 2)} | {("fish", "current", "fish", 1)}
    assert set(levels) == expected
    for row in levels.values():
        assert row["requests"] == row["ok"] == row["concurrency"]
        assert 0 < row["first_audio_ms"]["p50"] <= row["first_audio_ms"]["p99"]
        assert row["x_real_time"] > 0
    assert set(summary["engine"]) == {"baseline", "current"}
    assert summary["engine"]["current"]["chunk_batching"]["streams"].keys() == {"1", "2"}

    with tarfile.open(out / "gpu_bench.tar.gz") as packed:
        names = set(packed.getnames())
    assert {"results/engine_profile.txt", "results/device_check.json", "results/service_natural_current.json",
            "results/service_fixed_current.service.log"} <= names
    table = (out / "summary.txt").read_text()
    assert "device check: all stages within tolerance" in table and "natural" in table


def test_a_stage_passes_only_within_its_tolerance_and_finite() -> None:
    ref = torch.linspace(-1, 1, 1000)
    close, off = ref * (1 + 1e-4), ref + 0.1
    assert rel_error(close, ref) == pytest.approx(1e-4, rel=1e-3)  # float32 rounding of the scaled values
    assert StageCheck("b", "s", "float32", rel_error(close, ref), 5e-3).passed
    assert not StageCheck("b", "s", "float32", rel_error(off, ref), 5e-3).passed
    assert not StageCheck("b", "s", "float32", rel_error(ref * float("nan"), ref), 5e-3).passed
    assert StageCheck("b", "s", "bfloat16", 0.3, None).passed  # reported, not judged
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(ref[:10], ref)
